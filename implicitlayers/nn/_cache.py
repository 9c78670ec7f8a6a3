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
import threading
from typing import Iterator

import torch
from torch import nn

__all__ = ["CachedParametrization", "cached_weights"]


class _ThreadState(threading.local):
    """The cache's bookkeeping, one copy per thread.

    Two threads calling the same layer at once each get their own cached weight (with their own
    autograd graph): sharing one would let a thread backpropagate through a graph that another
    thread's backward has already freed.
    """

    def __init__(self) -> None:
        self.global_depth = 0  # argument-less `cached_weights()` blocks open in this thread
        self.open_blocks = 0  # blocks of any kind open in this thread
        self.depth: dict[int, int] = {}  # id(parametrization) -> module-specific blocks covering it
        self.cached: dict[int, tuple[tuple[torch.Tensor, ...], tuple[int, ...], torch.Tensor]] = {}


_state = _ThreadState()


def inside_functorch_transform() -> bool:
    """Whether the caller runs inside a `torch.func` transform (`vmap`, `grad`, `vjp`, `jvp`, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class CachedParametrization(nn.Module):
    """Base class of the parametrizations registered by `weight_norm` and `spectral_norm`.

    Subclasses implement `compute(*originals) -> Tensor`. `forward` returns the cached value when a
    [`cached_weights`][implicitlayers.nn.cached_weights] block of the calling thread covers this
    parametrization and the raw tensors are the very same objects, unmodified, as when the value
    was computed. The module itself holds no cache, so it pickles and deep-copies as a plain module.
    """

    def compute(self, *originals: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def caching(self) -> bool:
        """Whether a `cached_weights` block of the calling thread currently covers this parametrization."""
        return _state.global_depth > 0 or _state.depth.get(id(self), 0) > 0

    @property
    def _cached(self) -> tuple | None:
        """The calling thread's cache entry `(originals, versions, value)`, if any (for tests and debugging)."""
        return _state.cached.get(id(self))

    def forward(self, *originals: torch.Tensor) -> torch.Tensor:
        # Compiled regions recompute (the compiler fuses it); Dynamo need not trace the bookkeeping.
        if torch.compiler.is_compiling() or not self.caching:
            return self.compute(*originals)
        versions = tuple(t._version for t in originals)
        hit = _state.cached.get(id(self))
        if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], originals)):
            return hit[2]
        if inside_functorch_transform():
            return self.compute(*originals)
        # Record the graph even under the solver's no_grad, so later uses can backpropagate to the
        # raw parameters. Inference mode forbids autograd anyway, so it is left alone there.
        grad_mode = contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.enable_grad()
        with grad_mode:
            value = self.compute(*originals)
        # Versions are read after `compute`, which may update its own buffers but never the originals.
        _state.cached[id(self)] = (originals, tuple(t._version for t in originals), value)
        return value


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
      outlives the forward call. Blocks nest. The cache is per thread: concurrent calls from several
      threads each compute and keep their own weight.
    - Outside any block each access recomputes the weight, as plain `torch.nn.utils.parametrize` does.

    Args:
        *modules: modules whose parametrizations to cache; none means all of them.

    Example:
        ```python
        import torch
        import implicitlayers as il

        cell = il.nn.spectral_norm(torch.nn.Linear(64, 64), bound=0.9)
        x, z0 = torch.randn(8, 64), torch.zeros(8, 64)
        with il.nn.cached_weights(cell):
            z = il.fixed_point(lambda z: torch.tanh(cell(z) + x), z0).value  # one weight computation
        ```
    """
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"cached_weights: expected torch.nn.Module arguments, got {type(module).__name__}.")
    # Deduplicate so that a module passed twice (or shared by two cells) is entered once.
    targets = list({id(p): p for m in modules for p in m.modules() if isinstance(p, CachedParametrization)})
    state = _state
    state.open_blocks += 1
    if not modules:
        state.global_depth += 1
    for key in targets:
        state.depth[key] = state.depth.get(key, 0) + 1
    try:
        yield
    finally:
        for key in targets:
            state.depth[key] -= 1
            if state.depth[key] == 0:
                del state.depth[key]
                if state.global_depth == 0:
                    state.cached.pop(key, None)
        if not modules:
            state.global_depth -= 1
        state.open_blocks -= 1
        if state.global_depth == 0:
            # Keep only entries still covered by an open module-specific block: no graph outlives its call.
            for key in [k for k in state.cached if k not in state.depth]:
                del state.cached[key]
        if state.open_blocks == 0:
            state.cached.clear()
            state.depth.clear()
