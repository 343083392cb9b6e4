"""The built-in demo: a corpus from the Python installation, tokenizers and small models trained at run time."""
