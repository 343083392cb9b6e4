"""Random byte chunks for likelihood-matching tests: chunks of 1–3 consecutive predicted positions inside each run of
``loss_mask``, with a teacher log-probability per chunk."""

from __future__ import annotations

import numpy as np


def random_chunks(rng: np.random.Generator, loss_mask: np.ndarray, skip: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """loss_mask bool[B, T] → (start int32[B, T], logprob float32[B, T]) as the loader ships them for one teacher: at a
    chunk's last position the position of its first, −1 elsewhere; a share ``skip`` of the spans is no chunk."""
    b_, t_ = loss_mask.shape
    start = np.full((b_, t_), -1, np.int32)
    logprob = np.zeros((b_, t_), np.float32)
    for b in range(b_):
        t = 0
        while t < t_:
            if not loss_mask[b, t]:
                t += 1
                continue
            n = int(rng.integers(1, 4))
            end = t
            while end + 1 < t_ and end + 1 < t + n and loss_mask[b, end + 1]:
                end += 1
            if rng.random() >= skip:
                start[b, end] = t
                logprob[b, end] = -rng.uniform(0.01, 6.0) * (end - t + 1)
            t = end + 1
    return start, logprob
