"""`python -m fusion_jax.generate`, the same command as `fusion-jax generate` (:mod:`fusion_jax.cli.generate`)."""

if __name__ == "__main__":
    from fusion_jax.cli.generate import main

    main()
