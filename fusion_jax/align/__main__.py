"""`python -m fusion_jax.align`, the same command as `fusion-jax align` (:mod:`fusion_jax.cli.align`)."""

if __name__ == "__main__":
    from fusion_jax.cli.align import main

    main()
