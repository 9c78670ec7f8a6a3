"""`WeightTied`: the explicit counterpart of a DEQ, one cell applied a fixed number of times, optionally
with a distinct sparse mask on its weights at every application (Song, Majumder & Lin, 2023)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..nn._cache import cached_weights
from ._masks import apply_masks, maskable_modules, random_masks, user_masks

__all__ = ["WeightTied"]

Masks = Sequence[torch.Tensor | Mapping[str, torch.Tensor]]


class WeightTied(nn.Module):
    """`z_{l+1} = cell_l(z_l, x)` for `l = 0 … depth−1` from `z_0`, backpropagated through every step.

    Without masks, `cell_l = cell` for every `l`: the network a DEQ is the limit of. With a
    contractive cell, `WeightTied(cell, depth)(x)` tends to `il.DEQ(cell)(x)` as `depth` grows, and
    so do its gradients. Training memory grows linearly with `depth` (every step's activations are
    kept), which is what the DEQ's implicit backward avoids.

    With masks, `cell_l` is the cell with every `nn.Linear` and `nn.Conv1d/2d/3d` weight `W` replaced
    by `W ⊙ M_l`, where `M_l` is a binary mask of its own for each application `l` and each weight.
    The parameters are those of the cell (the masks are fixed buffers, not learned, and saved in
    `state_dict`), so a masked model has exactly as many parameters as the DEQ on the same cell.
    Biases, normalisation layers and other parameters stay dense. A weight reparametrised with
    `il.nn.weight_norm` or `il.nn.spectral_norm` is normalised once per forward call and then masked
    (so `‖W ⊙ M_l‖₂` may exceed the bound: masking is not a contraction in the spectral norm).
    The cell object is left untouched: `il.DEQ(wt.cell)` computes with the dense weights.

    `masks="random"` draws, for each weight, `depth` masks with exactly `round(density · numel)` ones
    each, uniformly without replacement, from `torch.Generator().manual_seed(seed)` (the same masks
    on every device), redrawing a mask equal to an earlier one of the same weight whenever the size
    allows `depth` distinct masks. The masks are unstructured (element-wise, also for convolutions)
    and have the same density for every weight of the cell. Each application forms its masked
    weights by one dense product and calls the dense kernels (`F.linear`, the convolution's own): at
    densities ≥ 0.25 this beats `torch.sparse` by a wide margin (`benchmarks/implicit_models.py`
    measures it).

    Args:
        cell: the map `(z, x) -> z'`; an `nn.Module` is registered as the submodule `cell`. With masks
            it must be an `nn.Module` with at least one `nn.Linear` / `nn.Conv*d`.
        depth: the number of applications (≥ 1).
        masks: `None` (no masks), `"random"` (drawn as above) or a list of `depth` masks, entry `l`
            being a 0/1 tensor shaped like the weight (when the cell has one maskable weight; a
            stacked `(depth, *weight.shape)` tensor works too) or a dict from each maskable module's
            name (as in `cell.named_modules()`, `""` for the cell itself) to its mask.
        density: the fraction of ones of each random mask, in (0, 1]; only with `masks="random"`
            (default 0.5).
        seed: the seed of the random masks; only with `masks="random"` (default 0).
        z_init: `None` (zeros shaped like `x`), a tensor (one sample's shape, or batched), or a
            callable of `x`, as for `il.DEQ`.

    Example:
        ```python
        import torch
        import implicitlayers as il

        class Cell(torch.nn.Module):
            def __init__(self, d):
                super().__init__()
                self.linear = torch.nn.Linear(d, d)

            def forward(self, z, x):
                return torch.tanh(self.linear(z) + x)

        wt = il.WeightTied(Cell(8), 6, masks="random", density=0.5, seed=0)
        z = wt(torch.randn(4, 8))               # (4, 8)
        print(wt.mask(0)["linear"].float().mean())   # tensor(0.5000)
        z.sum().backward()                     # plain backpropagation through the 6 steps
        ```
    """

    def __init__(
        self,
        cell: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        depth: int,
        *,
        masks: str | Masks | torch.Tensor | None = None,
        density: float | None = None,
        seed: int | None = None,
        z_init: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"WeightTied: cell must be a callable (z, x) -> z' or an nn.Module, got {type(cell).__name__}.")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"WeightTied: depth must be an integer >= 1, got {depth!r}.")
        if z_init is not None and not (isinstance(z_init, torch.Tensor) or callable(z_init)):
            raise TypeError(f"WeightTied: z_init must be None, a tensor or a callable of x, got {type(z_init).__name__}.")
        self.cell = cell
        self.depth = depth
        if isinstance(z_init, torch.Tensor):
            self.register_buffer("z_init", z_init.detach().clone())
        else:
            self.z_init = z_init
        self._masked: dict[str, nn.Module] = {}  # module name in the cell -> module (plain dict: not a submodule twice)
        self._buffer_of: dict[str, str] = {}  # module name in the cell -> buffer name on self
        self.density: float | None = None
        if masks is None:
            if density is not None or seed is not None:
                raise ValueError("WeightTied: density and seed apply to masks='random' only; pass masks='random' or drop them.")
            return
        self._masked = self._targets(cell)
        shapes = {name: module.weight.shape for name, module in self._masked.items()}
        if isinstance(masks, str):
            if masks != "random":
                raise ValueError(f"WeightTied: masks must be None, 'random' or a list of depth masks, got {masks!r}.")
            density = 0.5 if density is None else density
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
                raise ValueError(f"WeightTied: density must be a number in (0, 1], got {density!r}.")
            seed = 0 if seed is None else seed
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"WeightTied: seed must be an integer, got {seed!r}.")
            stacks = random_masks(shapes, depth, float(density), seed)
            self.density = float(density)
        else:
            if density is not None or seed is not None:
                raise ValueError("WeightTied: density and seed apply to masks='random' only, not to given masks.")
            stacks = user_masks(masks, shapes, depth)
        for name, stack in stacks.items():
            buffer = "mask_" + (name.replace(".", "_") or "cell")
            if hasattr(self, buffer):
                raise ValueError(f"WeightTied: two maskable modules map to the buffer name {buffer!r}; rename one.")
            # Buffers follow `.to(device)` and are saved in (and restored from) the state dict.
            self.register_buffer(buffer, stack.to(self._masked[name].weight.device))
            self._buffer_of[name] = buffer

    @staticmethod
    def _targets(cell: object) -> dict[str, nn.Module]:
        if not isinstance(cell, nn.Module):
            raise TypeError(f"WeightTied: masks need the cell to be an nn.Module (to find its weights), got {type(cell).__name__}.")
        targets = maskable_modules(cell)
        if not targets:
            raise ValueError("WeightTied: the cell has no nn.Linear or nn.Conv1d/2d/3d submodule whose weight could be masked.")
        return targets

    def mask(self, step: int) -> dict[str, torch.Tensor]:
        """The boolean masks of application `step` (0-based), by module name in the cell; `{}` without masks."""
        if not 0 <= step < self.depth:
            raise IndexError(f"WeightTied: step must be in [0, {self.depth}), got {step}.")
        return {name: getattr(self, buffer)[step] for name, buffer in self._buffer_of.items()}

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.z_init is None:
            return torch.zeros_like(x)
        if isinstance(self.z_init, torch.Tensor):
            start = self.z_init.to(dtype=x.dtype, device=x.device)
            return start if start.dim() > 1 and start.shape[0] == x.shape[0] else start.expand(x.shape[0], *start.shape)
        return self.z_init(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`z_depth` for the batch `x`."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"WeightTied: x must be a tensor with a leading batch dimension, got {x!r:.60}.")
        z = self._start(x)
        # Normalised weights (il.nn norms) are computed once for all the applications, as in a DEQ solve.
        with cached_weights():
            if not self._masked:
                for _ in range(self.depth):
                    z = self.cell(z, x)
                return z
            # Each weight (normalised, if it is) is read once. Masks are stored as booleans (a small state
            # dict) and converted once per call: a float product is ~2.5x faster than a bool one, and a
            # product per application is faster than slicing one stacked product, whose backward writes
            # a zero-filled gradient of the whole stack for every slice.
            weights = {name: module.weight for name, module in self._masked.items()}
            masks = {name: getattr(self, self._buffer_of[name]).to(weights[name].dtype) for name in self._masked}
            for step in range(self.depth):
                with apply_masks(self._masked, {name: weights[name] * masks[name][step] for name in self._masked}):
                    z = self.cell(z, x)
        return z

    def extra_repr(self) -> str:
        if not self._masked:
            return f"depth={self.depth}"
        kind = f"random, density={self.density:g}" if self.density is not None else "given"
        return f"depth={self.depth}, masks={kind} on {sorted(self._masked)}"
