"""Weights computed once per outer call: the cache behind `weight_norm` and `spectral_norm`.

A DEQ evaluates its cell tens of times per forward call. A normalised weight (`g·v/‖v‖`,
`W/σ(W)`) depends only on the parameters, so recomputing it at every solver iteration wastes work
and, for spectral norm, would advance the power iteration once per iteration. torchdeq asks users
to call `reset_norm` by hand before every forward; here the layer enters
[`cached_weights`][implicitlayers.nn.cached_weights] around its whole solve instead.

`torch.nn.utils.parametrize.cached()` is not used, for two reasons that matter to implicit layers:

1. its first access may happen inside the solver's `torch.no_grad()` loop, and the cached weight
   would then carry no graph, so every later use (re-evaluating the cell at `z*` for the IFT)
   would silently give zero gradients to the raw parameters;
2. it is keyed by `id(module)` only, so `torch.func.functional_call` with substituted parameters
   (iMAML's fast weights, `torch.func.vjp` over the parameters) would read the stale weight.

This cache is keyed by the *identity and version counter* of the raw tensors the parametrization
receives, is always filled with gradient recording on, and is never filled inside a `torch.func`
transform (a tensor built there is wrapped for that transform and must not escape it).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch import nn

__all__ = ["CachedParametrization", "cached_weights"]

# Depth of argument-less `cached_weights()` blocks, which cache every parametrization at once.
_global_depth = 0
# Blocks of any kind currently open, and a counter bumped whenever the last of them exits: an
# entry from an older generation is void even if some path failed to clear it.
_open_blocks = 0
_generation = 0
_registry: weakref.WeakSet[CachedParametrization] = weakref.WeakSet()


def inside_functorch_transform() -> bool:
    """Whether the caller runs inside a `torch.func` transform (`vmap`, `grad`, `vjp`, `jvp`, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class CachedParametrization(nn.Module):
    """Base class of the parametrizations registered by `weight_norm` and `spectral_norm`.

    Subclasses implement `compute(*originals) -> Tensor`. `forward` returns the cached value when a
    [`cached_weights`][implicitlayers.nn.cached_weights] block covers this parametrization and the
    raw tensors are the very same objects, unmodified, as when the value was computed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache_depth = 0
        self._cached: tuple[tuple[torch.Tensor, ...], tuple[int, ...], int, torch.Tensor] | None = None
        _registry.add(self)

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) starts outside any block, with no cached graph.
        return {**super().__getstate__(), "_cache_depth": 0, "_cached": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _registry.add(self)

    def compute(self, *originals: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def caching(self) -> bool:
        """Whether a `cached_weights` block currently covers this parametrization."""
        return self._cache_depth > 0 or _global_depth > 0

    def forward(self, *originals: torch.Tensor) -> torch.Tensor:
        # Compiled regions recompute (the compiler fuses it); Dynamo need not trace the bookkeeping.
        if torch.compiler.is_compiling() or not self.caching:
            return self.compute(*originals)
        versions = tuple(t._version for t in originals)
        hit = self._cached
        if (
            hit is not None
            and hit[2] == _generation
            and hit[1] == versions
            and all(a is b for a, b in zip(hit[0], originals))
        ):
            return hit[3]
        if inside_functorch_transform():
            return self.compute(*originals)
        # Record the graph even under the solver's no_grad, so later uses can backpropagate to the
        # raw parameters. Inference mode forbids autograd anyway, so it is left alone there.
        grad_mode = contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.enable_grad()
        with grad_mode:
            value = self.compute(*originals)
        # Versions are read after `compute`, which may update its own buffers but never the originals.
        self._cached = (originals, tuple(t._version for t in originals), _generation, value)
        return value

    def _enter(self) -> None:
        self._cache_depth += 1

    def _exit(self) -> None:
        self._cache_depth -= 1
        if not self.caching:
            self._cached = None


@contextlib.contextmanager
def cached_weights(*modules: nn.Module) -> Iterator[None]:
    """Compute each normalised weight at most once inside the block.

    Inside `with cached_weights(cell): ...`, every parametrization registered by
    [`weight_norm`][implicitlayers.nn.weight_norm] or [`spectral_norm`][implicitlayers.nn.spectral_norm]
    on `cell` or its submodules computes its weight on first access and returns that same tensor on
    every later access. With no arguments, the block covers every such parametrization in the
    process (use it when the cell is a closure whose modules the caller cannot list).

    How it works, precisely:

    - The cached tensor is computed with gradient recording on, even when first accessed inside
      `torch.no_grad()`, so re-evaluating the cell with grad enabled inside the block (for the IFT)
      backpropagates to the raw parameters (`g`, `v`, the unnormalised `W`).
    - The cache entry is used only while the raw tensors are the same objects with the same version
      counter. `torch.func.functional_call` with other tensors, or an in-place change of the
      parameters, therefore recomputes. Inside `torch.func` transforms the value is computed but
      never stored.
    - The cache is dropped when the outermost block covering the parametrization exits, so no graph
      outlives the forward call. Blocks nest.
    - Outside any block each access recomputes the weight, as plain `torch.nn.utils.parametrize` does.

    Args:
        *modules: modules whose parametrizations to cache; none means all of them.

    Example:
        ```python
        cell = il.nn.spectral_norm(torch.nn.Linear(64, 64))
        with il.nn.cached_weights(cell):
            z = il.fixed_point(lambda z: torch.tanh(cell(z) + x), z0).value  # one weight computation
        ```
    """
    global _global_depth, _open_blocks, _generation
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"cached_weights: expected torch.nn.Module arguments, got {type(module).__name__}.")
    # Deduplicate so that a module passed twice (or shared by two cells) is entered once.
    targets = list({id(p): p for m in modules for p in m.modules() if isinstance(p, CachedParametrization)}.values())
    _open_blocks += 1
    if not modules:
        _global_depth += 1
    for p in targets:
        p._enter()
    try:
        yield
    finally:
        for p in targets:
            p._exit()
        if not modules:
            _global_depth -= 1
            if _global_depth == 0:
                for p in list(_registry):
                    if not p.caching:
                        p._cached = None
        _open_blocks -= 1
        if _open_blocks == 0:
            _generation += 1
