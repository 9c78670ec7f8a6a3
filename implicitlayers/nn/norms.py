"""Weight and spectral normalisation for DEQ cells, computed once per outer forward call.

Both helpers register a `torch.nn.utils.parametrize` parametrization, so `module.weight` is the
normalised weight, the raw tensors live under `module.parametrizations.weight.original*`, and
`torch.nn.utils.parametrize.remove_parametrizations` folds them back. Inside
[`cached_weights`][implicitlayers.nn.cached_weights] (which `ImplicitLayer` enters around each
solve) the weight is computed once however many times the solver calls the cell.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ._cache import CachedParametrization, inside_functorch_transform

__all__ = ["spectral_norm", "weight_norm"]

# Module-level (not per module): a lock on the module would make it unpicklable.
_POWER_ITERATION_LOCK = threading.Lock()

_WARMUP_ITERATIONS = 20  # power iterations at registration, so σ is accurate from the first call


def _check_target(module: nn.Module, name: str, who: str) -> torch.Tensor:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who}: expected a torch.nn.Module, got {type(module).__name__}.")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{who}: {type(module).__name__} has no tensor attribute {name!r}; pass name= the weight's attribute.")
    if not weight.is_floating_point():
        raise TypeError(f"{who}: {type(module).__name__}.{name} must be floating point, got {weight.dtype}.")
    return weight


class _WeightNorm(CachedParametrization):
    """`W = g · v / ‖v‖`, the norm taken over every dimension except `dim` (all of them if `dim` is None)."""

    def __init__(self, dim: int | None) -> None:
        super().__init__()
        self.dim = dim

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            return torch.linalg.vector_norm(v)
        keep = self.dim % v.dim()
        dims = [d for d in range(v.dim()) if d != keep]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()

    def compute(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v * (g / self._norm(v))

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # g starts at ‖W‖, so registering the parametrization leaves the weight unchanged.
        return self._norm(weight), weight


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Reparametrise `module.<name>` as `W = g · v / ‖v‖` (Salimans & Kingma, 2016).

    With `dim=0` (rows of a `Linear`, output channels of a convolution) each row has norm `|g_i|`,
    so the spectral norm of `W` is at most `‖g‖₂`. `g` starts at the norms of the initial weight,
    so the module computes the same function right after registration.

    The raw tensors are `module.parametrizations.<name>.original0` (`g`) and `.original1` (`v`), as in
    `torch.nn.utils.parametrizations.weight_norm`; gradients reach both.

    Args:
        module: the module holding the weight.
        name: the weight's attribute name.
        dim: the dimension that keeps its own norm; `None` normalises the whole tensor by one scalar.

    Returns:
        `module`, modified in place.
    """
    weight = _check_target(module, name, "weight_norm")
    if dim is not None and not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"weight_norm: dim={dim} is out of range for {name} of shape {tuple(weight.shape)}.")
    parametrize.register_parametrization(module, name, _WeightNorm(dim))
    return module


class _SpectralNorm(CachedParametrization):
    """`W / max(σ/bound, 1)` (clip) or `W · bound / σ` (scale), σ from a persistent power iteration."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int, bound: float, clip: bool, dim: int, eps: float) -> None:
        super().__init__()
        self.n_power_iterations = n_power_iterations
        self.bound = bound
        self.clip = clip
        self.dim = dim
        self.eps = eps
        rows, cols = self._matrix(weight).shape
        u = F.normalize(weight.new_empty(rows).normal_(), dim=0, eps=eps)
        v = F.normalize(weight.new_empty(cols).normal_(), dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        # The raw weight (and its version) the power iteration last advanced for.
        self._seen: tuple[weakref.ref[torch.Tensor], int] | None = None
        self._power_iteration(self._matrix(weight.detach()), _WARMUP_ITERATIONS)

    def __getstate__(self) -> dict:
        # A weak reference cannot be pickled; a copy re-keys on its first training step.
        return {**super().__getstate__(), "_seen": None}

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.movedim(self.dim, 0).flatten(1)

    @torch.no_grad()
    def _power_iteration(self, matrix: torch.Tensor, n: int) -> None:
        for _ in range(n):
            self._u.copy_(F.normalize(matrix @ self._v, dim=0, eps=self.eps))
            self._v.copy_(F.normalize(matrix.mT @ self._u, dim=0, eps=self.eps))

    def _advance(self, weight: torch.Tensor) -> bool:
        """Whether to run the power iteration now: once per new value of the real parameter.

        Keying on the parameter's version counter (bumped by every optimizer step) means u moves once
        per training step however often the weight is computed, so the solver, the re-evaluation at
        `z*` and the backward all see the same weight. Substituted tensors (functional_call,
        torch.func transforms) never move u: they are not this module's parameter.
        """
        if not self.training or not isinstance(weight, nn.Parameter) or inside_functorch_transform():
            return False
        seen = self._seen
        return seen is None or seen[0]() is not weight or seen[1] != weight._version

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = self._matrix(weight)
        if torch.compiler.is_compiling():
            u, v = self._u.clone(), self._v.clone()
        else:
            # One lock for the check-advance-read sequence: two threads must neither both advance u for
            # one parameter update nor read u, v while another thread writes them.
            with _POWER_ITERATION_LOCK:
                if self._advance(weight):
                    self._power_iteration(matrix.detach(), self.n_power_iterations)
                    self._seen = (weakref.ref(weight), weight._version)
                # Clones: a later in-place update of the buffers must not invalidate graphs built now.
                u, v = self._u.clone(), self._v.clone()
        sigma = torch.dot(u, matrix @ v)
        factor = torch.clamp(sigma / self.bound, min=1.0) if self.clip else sigma / self.bound
        return weight / factor


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    bound: float = 1.0,
    *,
    clip: bool = True,
    dim: int | None = None,
    eps: float = 1e-12,
) -> nn.Module:
    """Bound the spectral norm of `module.<name>` by `bound` (Miyato et al., 2018).

    σ is estimated as `uᵀ W v` with persistent unit vectors `u`, `v` (buffers, saved in the state
    dict). The effective weight is

    - `clip=True` (default): `W / max(σ/bound, 1)`. Weights already within the bound pass through
      unchanged, so the helper only ever shrinks; this is the constraint a contractive DEQ cell needs.
    - `clip=False`: `W · bound / σ`, σ pinned at `bound` (torch's and torchdeq's behaviour).

    The power iteration runs 20 steps at registration and then `n_power_iterations` steps each time
    the raw parameter changes (detected by its version counter, i.e. once per optimizer step), in
    training mode only. It never runs per solver iteration, nor in the backward pass, nor for tensors
    substituted by `torch.func.functional_call`. The estimate approaches σ from below, so right after
    a large parameter change the effective spectral norm can exceed `bound` slightly; it converges
    as training proceeds.

    Weights with more than two dimensions are flattened to `(shape[dim], -1)`, as in torch; for
    convolutions this bounds that matrix, not the convolution's operator norm.

    Args:
        module: the module holding the weight.
        name: the weight's attribute name.
        n_power_iterations: power-iteration steps per parameter update (≥ 1).
        bound: the target spectral norm (> 0).
        clip: clip to the bound (`True`) or always rescale to it (`False`).
        dim: the output dimension; defaults to 1 for transposed convolutions, else 0.
        eps: floor on norms in the power iteration.

    Returns:
        `module`, modified in place.
    """
    weight = _check_target(module, name, "spectral_norm")
    if weight.dim() < 2:
        raise ValueError(f"spectral_norm: {name} must have at least 2 dimensions, got shape {tuple(weight.shape)}.")
    if not isinstance(n_power_iterations, int) or n_power_iterations < 1:
        raise ValueError(f"spectral_norm: n_power_iterations must be an integer >= 1, got {n_power_iterations!r}.")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
        raise ValueError(f"spectral_norm: bound must be positive (a finite number), got {bound!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"spectral_norm: eps must be positive (a finite number: it guards the power iteration's norms), got {eps!r}.")
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"spectral_norm: dim={dim} is out of range for {name} of shape {tuple(weight.shape)}.")
    parametrization = _SpectralNorm(weight, n_power_iterations, float(bound), clip, dim % weight.dim(), eps)
    parametrize.register_parametrization(module, name, parametrization)
    return module
