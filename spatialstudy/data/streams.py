"""Disjoint random streams by role: every set the study generates (pretraining pool, held-out checks, SpaceThinker
train/test, the benchmark, dev slices) draws from its own stream, derived from the one user seed and the role's
name. `seed + k` would make neighbouring seeds of two roles collide (seed 0's test set = seed 1's train set), and
every stream seeded 0 would start with the same scene."""
from __future__ import annotations

import zlib

import numpy as np


def role_seed(seed: int, role: str) -> int:
    """A 63-bit seed for `role` under the user seed: numpy's SeedSequence keyed by (seed, crc32(role))."""
    if not role:
        raise ValueError("role must be a non-empty name")
    ss = np.random.SeedSequence([int(seed), zlib.crc32(role.encode())])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)
