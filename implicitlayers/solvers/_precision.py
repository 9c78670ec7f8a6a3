"""The dtype in which the solvers' small dense systems are solved."""

from __future__ import annotations

import torch

__all__ = ["work_dtype", "dot", "bmm"]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 and bfloat16, else `dtype` itself.

    The solvers' `m × m` systems (Anderson's Gram matrix, Broyden's triangle) and their stopping norms
    need more range and precision than half precision has (a Gram entry is a squared norm: it overflows
    float16 at a residual of 256), and `torch.linalg`'s solvers are not implemented for these dtypes on
    every device. They are small, so solving them in float32 costs nothing measurable.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products of `(B, D)` tensors, accumulated and returned in `work_dtype`."""
    dtype = work_dtype(a.dtype)
    if dtype != a.dtype:  # a float16 product overflows at 256²: widen first
        a, b = a.to(dtype), b.to(dtype)
    return torch.linalg.vecdot(a, b)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.bmm` returned in `work_dtype` of its inputs (widened first for half precision)."""
    dtype = work_dtype(a.dtype)
    if dtype != a.dtype:
        a, b = a.to(dtype), b.to(dtype)
    return torch.bmm(a, b)
