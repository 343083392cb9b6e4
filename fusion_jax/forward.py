"""`python -m fusion_jax.forward`, the same command as `fusion-jax forward` (:mod:`fusion_jax.cli.forward`)."""

if __name__ == "__main__":
    from fusion_jax.cli.forward import main

    main()
