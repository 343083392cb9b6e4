"""`python -m fusion_jax.import_fusellm`, the same command as `fusion-jax import_fusellm` (:mod:`fusion_jax.cli.import_fusellm`)."""

if __name__ == "__main__":
    from fusion_jax.cli.import_fusellm import main

    main()
