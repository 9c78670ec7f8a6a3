"""Support for `torch.func` transforms and forward-mode AD over implicit layers.

The solver loop stops on data (per-sample convergence tests on the host), which `torch.func.vmap`
cannot trace; `FoldedCall` turns a solve into one opaque operation whose vmap rule folds the vmapped
dimension into the batch dimension (samples never interact, so that is exact). Reverse and forward
mode (`torch.func.grad`, `vjp`, `jvp`, `torch.autograd.forward_ad`) go through the IFT's autograd
functions in `implicitlayers._ift`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from .nn._cache import inside_functorch_transform

__all__ = ["FoldedCall", "active_transforms", "tangents_may_flow", "inside_functorch_transform", "vmapped_solve",
           "with_cached_signature"]


def with_cached_signature(cls: type) -> type:
    """Store the signature of an autograd function's `forward` on it: `Function.apply` binds default arguments
    with `inspect.signature(forward)` on every call when `setup_context` is defined, which costs microseconds
    that a small solve pays on each call (`inspect.signature` returns a stored `__signature__` at once)."""
    cls.forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
    return cls


def tangents_may_flow() -> bool:
    """Whether derivatives may flow without `requires_grad` showing it: forward-mode AD is active
    (`torch.autograd.forward_ad.dual_level`) or a `torch.func` differentiation transform is running."""
    return torch.autograd.forward_ad._current_level >= 0 or bool(active_transforms() & {"grad", "jvp"})


def active_transforms() -> set[str]:
    """The `torch.func` transforms currently running (`"vmap"`, `"grad"`, `"jvp"`, ...)."""
    if not inside_functorch_transform():
        return set()
    return {i.key().name.lower() for i in retrieve_all_functorch_interpreters()}


@with_cached_signature
class FoldedCall(torch.autograd.Function):
    """`fn(*tensors)`, with every tensor batched along dim 0, as one opaque non-differentiable operation
    whose `vmap` rule folds the vmapped dimension into that batch dimension.

    Samples of a block never interact, so a solve vmapped over `V` copies is one solve of `V·B` samples;
    the solver loop (data-dependent stopping) then never sees a batched tensor.
    """

    @staticmethod
    def forward(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        return fn(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output)
        ctx.n_inputs = len(inputs)

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - the output is non-differentiable
        return (None,) * ctx.n_inputs

    @staticmethod
    def vmap(info, in_dims, fn, *tensors):
        size = info.batch_size
        folded = []
        for t, dim in zip(tensors, in_dims[1:]):
            t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
            folded.append(t.reshape(size * t.shape[1], *t.shape[2:]))
        out = FoldedCall.apply(fn, *folded)
        return out.reshape(size, -1, *out.shape[1:]), 0


def vmapped_solve(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, unsupported: str | None = None) -> torch.Tensor:
    """`FoldedCall.apply(fn, *tensors)`, with a clear error when the user's functions read a vmapped tensor
    that is not among `tensors` (parameters stacked for an ensemble through `functional_call`); `unsupported`
    replaces the error's text."""
    try:
        return FoldedCall.apply(fn, *tensors)
    except RuntimeError as err:
        if "escaped" not in str(err) and "data-dependent" not in str(err):
            raise
        raise NotImplementedError(
            unsupported or "torch.func.vmap over an implicit layer supports vmapped inputs only; the layer's functions read a "
            "tensor that is vmapped too (e.g. parameters stacked for an ensemble through functional_call). Solve "
            "each member in a loop, or stack the members along the batch dimension inside one model."
        ) from err
