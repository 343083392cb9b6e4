"""`python -m fusion_jax.train`, the same command as `fusion-jax train` (:mod:`fusion_jax.cli.train`)."""

if __name__ == "__main__":
    from fusion_jax.cli.train import main

    main()
