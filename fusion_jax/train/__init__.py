"""Training the target: the jitted, sharded train step, the optimizer, checkpoints and the loop."""
