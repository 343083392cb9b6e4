"""`python -m fusion_jax.convert`, the same command as `fusion-jax convert` (:mod:`fusion_jax.cli.convert`)."""

if __name__ == "__main__":
    from fusion_jax.cli.convert import main

    main()
