"""`python -m fusion_jax.evaluate`, the same command as `fusion-jax evaluate` (:mod:`fusion_jax.cli.evaluate`)."""

if __name__ == "__main__":
    from fusion_jax.cli.evaluate import main

    main()
