"""Data stages: corpus readers (`corpus`), the long-document split rule (`splitting`) and the prepared
documents store (`documents`) written by `python -m fusion_jax.prepare`."""
