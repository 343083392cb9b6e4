"""Cross-tokenizer alignment: host-side pure functions over int arrays."""
