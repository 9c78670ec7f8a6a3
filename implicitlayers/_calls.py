"""What a call of a layer receives: the input checks and each variable's batched start."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from ._transforms import active_transforms
from .problem import Problem

__all__ = ["InitSpec", "check_inputs", "batched_start", "check_init", "init_mapping"]

InitSpec = torch.Tensor | Callable[..., torch.Tensor]


def check_inputs(input_names: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's input tensors by name, after checking count, type, batch size, device, dtype and values."""
    if len(tensors) != len(input_names):
        raise TypeError(
            f"ImplicitLayer: expected {len(input_names)} input tensor(s) ({', '.join(input_names)}), got {len(tensors)}."
        )
    env: dict[str, torch.Tensor] = {}
    first = None
    vmapped = "vmap" in active_transforms()
    for name, t in zip(input_names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ImplicitLayer: input {name!r} must be a torch.Tensor, got {type(t).__name__}.")
        if t.device.type == "meta":
            raise NotImplementedError(
                f"ImplicitLayer: input {name!r} is on the 'meta' device. An implicit layer's output shape and "
                "values come from an iterative solve that must read values, so meta tensors are not supported; "
                "run it on 'cpu' (a batch of one is enough to learn the output shapes)."
            )
        if t.dim() == 0:
            raise ValueError(f"ImplicitLayer: input {name!r} must have a leading batch dimension, got a scalar.")
        if first is None:
            first = (name, t)
        else:
            fname, ft = first
            if t.shape[0] != ft.shape[0]:
                raise ValueError(
                    f"ImplicitLayer: inputs disagree on the batch size: {fname!r} has {ft.shape[0]}, {name!r} has {t.shape[0]}."
                )
            if t.device != ft.device:
                raise ValueError(f"ImplicitLayer: input {name!r} is on {t.device} but {fname!r} is on {ft.device}; move them to one device.")
            if t.is_floating_point() and ft.is_floating_point() and t.dtype != ft.dtype:
                raise TypeError(f"ImplicitLayer: input {name!r} is {t.dtype} but {fname!r} is {ft.dtype}; use one floating dtype.")
        # (Under torch.func.vmap a host-side test of values is impossible; the solve reports non-finite samples.)
        if t.is_floating_point() and not vmapped and not _all_finite(t):
            raise ValueError(f"ImplicitLayer: input {name!r} contains NaN or Inf values.")
        env[name] = t
    if tensors and not any(t.is_floating_point() for t in tensors):
        raise TypeError("ImplicitLayer: at least one input must be a floating-point tensor (it sets the dtype of the solve).")
    return env


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: NaN and ±inf reach the minimum or the maximum. One reduction instead of
    `isfinite(t).all()`, which writes a mask as large as `t` (≈ 20× slower on a batch of images)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t.detach())
    return math.isfinite(low) and math.isfinite(high)


def batched_start(
    name: str, spec: InitSpec, tensors: Sequence[torch.Tensor], batch: int, ref: torch.Tensor, sample_shapes: dict[str, tuple[int, ...]]
) -> torch.Tensor:
    """The `(B, ...)` start of a variable from its `init` entry.

    A callable's result is a batched start, whatever its sample shape (so a convolutional model may
    be called at a new image size). A tensor whose first dimension is B (with at least two
    dimensions) is a batched start; any other tensor is one sample's start, broadcast over the batch.
    Once a tensor start's sample shape is known, a tensor equal to that sample shape is always
    broadcast and a tensor of any other shape is an error (`sample_shapes`, the layer's memory of
    them, is updated here). For a matrix-shaped variable whose first dimension may equal the batch
    size, pass a callable.
    """
    from_callable = callable(spec) and not isinstance(spec, torch.Tensor)
    value = spec(*tensors) if from_callable else spec
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"ImplicitLayer: init for {name!r} must be a tensor or return one, got {type(value).__name__}.")
    value = value.detach().to(device=ref.device, dtype=ref.dtype)
    if from_callable:
        if value.dim() < 1 or value.shape[0] != batch:
            raise ValueError(
                f"ImplicitLayer: the init callable for {name!r} returned shape {tuple(value.shape)}; it must return a "
                f"batched start whose first dimension is the batch size {batch}."
            )
        return value
    known = sample_shapes.get(name)
    if known is not None:
        batched = tuple(value.shape) == (batch, *known)
        if not batched and tuple(value.shape) != known:
            raise ValueError(
                f"ImplicitLayer: init for {name!r} has shape {tuple(value.shape)}, which is neither one sample {known} "
                f"nor a batch {(batch, *known)}. A start that must follow the inputs' shapes is a callable of the inputs."
            )
    else:
        batched = value.dim() > 1 and value.shape[0] == batch
        sample_shapes[name] = tuple(value.shape[1:]) if batched else tuple(value.shape)
    return value if batched else value.expand(batch, *value.shape).contiguous()


def init_mapping(init: object) -> dict[str, Any]:
    """`init` as a dict by variable name (`None` is empty); any other container is a `TypeError` that says so.

    A bare tensor or a list would otherwise fail later with a message about missing variables or torch's
    "Boolean value of Tensor ... is ambiguous".
    """
    if init is None:
        return {}
    if not isinstance(init, Mapping):
        raise TypeError(
            f"ImplicitLayer: init must be a dict {{variable name: tensor or callable of the inputs}}, got "
            f"{type(init).__name__}; e.g. init={{'z': torch.zeros(16)}}."
        )
    for key in init:
        if not isinstance(key, str):
            name = getattr(key, "name", None)
            hint = f" (use its name, {name!r})" if isinstance(name, str) else ""
            raise TypeError(f"ImplicitLayer: init keys must be variable names (str), got {key!r}{hint}.")
    return dict(init)


def check_init(init: Mapping[str, Any], problem: Problem) -> None:
    """Every `init` entry names a variable of `problem` and is a tensor or a callable."""
    extra = sorted(set(init) - set(problem.variables))
    if extra:
        raise ValueError(f"ImplicitLayer: init names unknown variable(s) {extra}; variables are {sorted(problem.variables)}.")
    for name, spec in init.items():
        if not (isinstance(spec, torch.Tensor) or callable(spec)):
            raise TypeError(f"ImplicitLayer: init for {name!r} must be a tensor or a callable of the inputs, got {type(spec).__name__}.")
