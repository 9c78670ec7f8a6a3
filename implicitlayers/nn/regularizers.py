"""Jacobian regularisation and spectral-radius monitoring for fixed-point maps (Bai, Koltun & Kolter, 2021).

Both take a callable `f: z -> f(z)` (a closure over the input and the parameters) and a point `z`,
usually the equilibrium `z*`. `z` is detached and treated as the evaluation point: gradients of the
regulariser flow to whatever `f` captures (parameters, the input), not back through `z*`'s solve,
which is what the DEQ literature does.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

__all__ = ["jacobian_regularizer", "spectral_radius"]

Map = Callable[[torch.Tensor], torch.Tensor]


def _leaf_and_value(f: Map, z: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not callable(f):
        raise TypeError(f"{who}: f must be callable z -> f(z), got {type(f).__name__}.")
    if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[0] == 0 or not z.is_floating_point():
        got = f"shape {tuple(z.shape)}, dtype {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{who}: z must be a floating-point tensor (B, ...) with B >= 1, got {got}.")
    z_leaf = z.detach().requires_grad_(True)
    # Grad mode is switched on locally so that both functions also work as monitors under no_grad.
    with torch.enable_grad():
        fz = f(z_leaf)
    if not isinstance(fz, torch.Tensor) or fz.dim() < 1 or fz.shape[0] != z.shape[0]:
        got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
        raise ValueError(f"{who}: f returned {got} for z of shape {tuple(z.shape)}; it must keep the batch dimension.")
    return z_leaf, fz


def _vjp(fz: torch.Tensor, z: torch.Tensor, cotangent: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if not fz.requires_grad:  # f ignores z: the Jacobian is zero
        return torch.zeros_like(z)
    (out,) = torch.autograd.grad(fz, z, cotangent, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(z) if out is None else out


def jacobian_regularizer(
    f: Map,
    z: torch.Tensor,
    probes: int = 1,
    *,
    normalize: bool = False,
    reduction: Literal["mean", "none"] = "mean",
    create_graph: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hutchinson estimate of the squared Frobenius norm of the Jacobian, `‖∂f/∂z‖_F²`, per sample.

    For each sample `b` with Jacobian `J_b`, and probes `ε ~ N(0, I)` in the output space,
    `E‖εᵀ J_b‖² = tr(J_b J_bᵀ) = ‖J_b‖_F²`, so the average of `‖εᵀ J_b‖²` over `probes` draws is an
    unbiased estimate. Each probe costs one vector–Jacobian product for the whole batch (samples
    do not interact, so one batched VJP gives every sample's `εᵀ J_b`).

    Add `γ · jacobian_regularizer(lambda z: cell(z, x), z_star, normalize=True)` to the training loss to
    keep the equilibrium map well conditioned; Bai et al. use γ ≈ 0.5–2 with one probe.

    Args:
        f: the map, `(B, ...) -> (B, ...)`; samples must not interact.
        z: the evaluation point, `(B, ...)`; detached.
        probes: number of Gaussian probes averaged (≥ 1).
        normalize: divide by the per-sample dimension `z[0].numel()`, giving `‖J‖_F² / d` as in
            Bai et al. (2021) and torchdeq's `jac_reg`; `False` gives `‖J‖_F²` itself.
        reduction: `"mean"` over the batch (a scalar) or `"none"` (shape `(B,)`).
        create_graph: keep the graph so the estimate can be backpropagated to the parameters;
            defaults to whether grad mode is on at the call.
        generator: the random generator for the probes.

    Returns:
        A scalar, or `(B,)` with `reduction="none"`.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"jacobian_regularizer: probes must be an integer >= 1, got {probes!r}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"jacobian_regularizer: reduction must be 'mean' or 'none', got {reduction!r}.")
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    z_leaf, fz = _leaf_and_value(f, z, "jacobian_regularizer")
    batch = z.shape[0]
    total = fz.new_zeros(batch)
    with torch.enable_grad():
        for _ in range(probes):
            eps = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
            total = total + _vjp(fz, z_leaf, eps, create_graph).reshape(batch, -1).pow(2).sum(dim=1)
    per_sample = total / probes
    if normalize:
        per_sample = per_sample / z[0].numel()
    return per_sample.mean() if reduction == "mean" else per_sample


def spectral_radius(
    f: Map, z: torch.Tensor, n_iter: int = 20, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Power-iteration estimate of the spectral radius ρ(∂f/∂z) at `z`, per sample.

    Iterates `v ← Jᵀv / ‖Jᵀv‖` with vector–Jacobian products (`Jᵀ` has the eigenvalues of `J`; one
    forward evaluation of `f`, then `n_iter` VJPs). The estimate is the geometric mean of the growth
    factors `‖Jᵀv‖` over the second half of the iterations: for a real dominant eigenvalue each
    factor tends to ρ, and for a complex-conjugate dominant pair, whose factors oscillate, their
    product over the window still grows like ρ^k. A fixed-point solver converges locally when ρ < 1.

    Args:
        f: the map, `(B, ...) -> (B, ...)` with the shape of `z`; samples must not interact.
        z: the evaluation point, `(B, ...)`; detached.
        n_iter: number of power-iteration steps (≥ 1).
        generator: the random generator for the start vector.

    Returns:
        `(B,)`, detached (a monitor, not a loss; use `jacobian_regularizer` to penalise).
    """
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"spectral_radius: n_iter must be an integer >= 1, got {n_iter!r}.")
    z_leaf, fz = _leaf_and_value(f, z, "spectral_radius")
    if fz.shape != z.shape:
        raise ValueError(f"spectral_radius: f must map z to its own shape {tuple(z.shape)}, got {tuple(fz.shape)}.")
    batch = z.shape[0]
    tiny = torch.finfo(fz.dtype).tiny
    v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
    v = v / v.reshape(batch, -1).norm(dim=1).clamp_min(tiny).view(-1, *([1] * (v.dim() - 1)))
    log_growth = []
    with torch.enable_grad():
        for _ in range(n_iter):
            w = _vjp(fz, z_leaf, v, create_graph=False)
            norm = w.reshape(batch, -1).norm(dim=1).clamp_min(tiny)
            log_growth.append(norm.log())
            v = w / norm.view(-1, *([1] * (w.dim() - 1)))
    window = torch.stack(log_growth[n_iter // 2 :])
    return window.mean(dim=0).exp().detach()
