"""`python -m fusion_jax.prepare`, the same command as `fusion-jax prepare` (:mod:`fusion_jax.cli.prepare`)."""

if __name__ == "__main__":
    from fusion_jax.cli.prepare import main

    main()
