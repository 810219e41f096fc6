"""Shared tiny models for the model tests (built once per session to keep compilation cheap)."""

import jax
import numpy as np
import pytest

import prefjax.models as pm


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` preset with an LM head."""
    # A larger init than the default 0.02 so logits are O(1) and comparisons are meaningful.
    return pm.from_preset("tiny", key=jax.random.key(0), init_std=0.1)


@pytest.fixture(scope="session")
def batch():
    """A [3, 8] batch: row 0 unpadded, row 1 left-padded by 3, row 2 right-padded by 2."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 256, size=(3, 8)).astype(np.int32)
    mask = np.ones((3, 8), np.int32)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    ids[mask == 0] = 256  # the byte tokenizer's pad id
    return ids, mask
