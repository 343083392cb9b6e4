"""Evaluation of a model: held-out bits per byte (bpb) and the forward smoke job (forward)."""
