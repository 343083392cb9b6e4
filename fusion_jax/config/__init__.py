"""The config tree (schema), the model's config (model) and the loader that reads YAML and `--set` into them."""
