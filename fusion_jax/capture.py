"""`python -m fusion_jax.capture`, the same command as `fusion-jax capture` (:mod:`fusion_jax.cli.capture`)."""

if __name__ == "__main__":
    from fusion_jax.cli.capture import main

    main()
