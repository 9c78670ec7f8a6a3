"""Distinct sparse masks for a weight-tied model: which weights are masked, how masks are drawn, how they are applied.

A masked weight-tied step `l` computes the cell with every linear and convolution weight `W`
replaced by `W ⊙ M_l`. The cell itself is never modified: for the duration of one application each
masked module gets an instance-level `forward` that calls the functional kernel (`F.linear`, the
convolution's `_conv_forward`) with the masked weight, and the module's own `forward` is restored
afterwards. Because the masked weight is computed from `module.weight`, a weight reparametrised by
`il.nn.weight_norm` / `il.nn.spectral_norm` is normalised first and masked second.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["apply_masks", "maskable_modules", "random_masks", "user_masks"]

# Modules whose weight is masked, each with the stock `forward` it must still have (a subclass that
# overrides `forward` might not read `self.weight` the way the functional kernel below assumes).
_MASKABLE: tuple[tuple[type[nn.Module], object], ...] = (
    (nn.Linear, nn.Linear.forward),
    (nn.Conv1d, nn.Conv1d.forward),
    (nn.Conv2d, nn.Conv2d.forward),
    (nn.Conv3d, nn.Conv3d.forward),
)


def maskable_modules(cell: nn.Module) -> dict[str, nn.Module]:
    """The `nn.Linear` and `nn.Conv1d/2d/3d` submodules of `cell` (itself included), by qualified name.

    Raises:
        TypeError: a subclass of one of them (or the instance itself) overrides `forward`, so its weight
            cannot be masked safely.
    """
    found: dict[str, nn.Module] = {}
    for name, module in cell.named_modules():
        for kind, stock_forward in _MASKABLE:
            if isinstance(module, kind):
                if type(module).forward is not stock_forward or "forward" in vars(module):
                    raise TypeError(
                        f"WeightTied: cannot mask {name or 'the cell'} ({type(module).__name__}): it overrides "
                        f"{kind.__name__}.forward; use a plain {kind.__name__} or pass masks=None."
                    )
                found[name] = module
                break
    return found


def random_masks(shapes: Mapping[str, torch.Size], depth: int, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Boolean masks `(depth, *shape)` per weight, each with exactly `round(density · numel)` ones.

    Entries are drawn uniformly without replacement, independently per weight and per application,
    from one CPU generator seeded with `seed` (so the masks do not depend on the device). Masks of one
    weight are redrawn until they differ from each other whenever there are at least `depth` distinct
    masks of that size (all of them coincide at density 1).
    """
    generator = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        ones = max(1, round(density * numel))
        distinct = math.comb(numel, ones) >= depth
        stack = torch.zeros(depth, numel, dtype=torch.bool)
        seen: set[bytes] = set()
        for step in range(depth):
            while True:
                stack[step].zero_()
                stack[step, torch.randperm(numel, generator=generator)[:ones]] = True
                key = stack[step].numpy().tobytes()
                if not distinct or key not in seen:
                    break
            seen.add(key)
        masks[name] = stack.reshape(depth, *shape)
    return masks


def user_masks(given: Sequence[torch.Tensor | Mapping[str, torch.Tensor]], shapes: Mapping[str, torch.Size], depth: int) -> dict[str, torch.Tensor]:
    """Stack a user's per-application masks into boolean `(depth, *shape)` tensors per weight.

    `given[l]` is a tensor (when the cell has exactly one maskable weight) or a mapping from each
    weight's module name to its mask; entries must be 0/1 (or boolean) and shaped like the weight.
    A tensor `given` of shape `(depth, *weight.shape)` counts as the list of its slices.
    """
    if isinstance(given, torch.Tensor) and given.dim() > 0:
        given = list(given.unbind(0))
    if not isinstance(given, Sequence) or isinstance(given, str) or len(given) != depth:
        got = f"{len(given)} entries" if isinstance(given, Sequence) else type(given).__name__
        raise ValueError(f"WeightTied: masks must be a list of depth={depth} masks (one per application), got {got}.")
    names = list(shapes)
    per_step: list[Mapping[str, torch.Tensor]] = []
    for step, entry in enumerate(given):
        if isinstance(entry, torch.Tensor):
            if len(names) != 1:
                raise ValueError(
                    f"WeightTied: masks[{step}] is a tensor but the cell has {len(names)} maskable weights {names}; give a dict from module name to mask."
                )
            entry = {names[0]: entry}
        if not isinstance(entry, Mapping) or set(entry) != set(names):
            got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise ValueError(f"WeightTied: masks[{step}] must give a mask for each of {names}, got {got}.")
        per_step.append(entry)
    stacked: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        masks = [torch.as_tensor(entry[name]) for entry in per_step]
        for step, mask in enumerate(masks):
            if mask.shape != shape:
                raise ValueError(f"WeightTied: masks[{step}][{name!r}] has shape {tuple(mask.shape)}, the weight {tuple(shape)}.")
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError(f"WeightTied: masks[{step}][{name!r}] must hold only 0 and 1 (or booleans).")
        stacked[name] = torch.stack([mask.detach().to("cpu", torch.bool) for mask in masks])
    return stacked


def _masked_forward(module: nn.Module, weight: torch.Tensor):
    if isinstance(module, nn.Linear):
        return functools.partial(F.linear, weight=weight, bias=module.bias)
    return functools.partial(module._conv_forward, weight=weight, bias=module.bias)


@contextlib.contextmanager
def apply_masks(modules: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, each `modules[name]` computes with `weights[name]` in place of its own weight."""
    for name, module in modules.items():
        module.forward = _masked_forward(module, weights[name])
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward
