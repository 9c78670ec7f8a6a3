"""The elementary strategies every other strategy draws from: dtypes, batch sizes and seeds.

A module of their own so that `strategies.py` and the strategies it re-exports (`_graphs.py`,
`_objectives.py`) import them without importing each other.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

__all__ = ["DTYPES", "dtypes", "batch_sizes", "seeds"]

DTYPES = (torch.float32, torch.float64)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """`torch.float32` or `torch.float64`."""
    return st.sampled_from(DTYPES)


def batch_sizes(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[int]:
    """Batch sizes in `[min_size, max_size]` (shrinking towards `min_size`)."""
    return st.integers(min_size, max_size)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for `torch.Generator`, from which the strategies draw weights and inputs."""
    return st.integers(0, 2**31 - 1)
