"""`fusion-jax <command> [args]`: one entry point for every command (each is also `python -m fusion_jax.<command>`)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "the fusion run, every stage it needs (documents → capture → train → evaluate → export)",
    "prepare": "a corpus → a document store (split, filtered, held-out validation)",
    "capture": "one teacher over a document store → its top-k cache",
    "evaluate": "held-out bits per byte of a model",
    "generate": "continue prompts with a model (greedy or sampled, KV cache, batched)",
    "forward": "a forward pass of a model on the mesh (a smoke test and a throughput figure)",
    "convert": "Hugging Face ⇄ fusion_jax model directories",
    "align": "alignment audit of tokenizer pairs (no model)",
    "import_fusellm": "the official FuseLLM pipeline's features → a document store and teacher caches",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
        print("usage: fusion-jax COMMAND [--config FILE] [--set KEY=VALUE ...]   (COMMAND --help for its keys)\n\n"
              "commands:\n" + "\n".join(lines))
        sys.exit(0 if argv else 2)
    command = argv[0].replace("-", "_")
    if command not in COMMANDS:
        sys.exit(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}")
    importlib.import_module(f"fusion_jax.cli.{command}").main(argv[1:])


if __name__ == "__main__":
    main()
