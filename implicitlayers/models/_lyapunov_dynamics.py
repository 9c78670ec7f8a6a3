"""The vector fields of LyaDEQ's readings: Kolter & Manek's projection and the balanced pull.

Both act on the DEQ's continuous-time dynamics `F(z) = f(z, x) − z`, given `V(z)` and `∇V(z)` per
sample; `implicitlayers.models.lyadeq` decides where `V` is centred and how the state is solved.
"""

from __future__ import annotations

import torch

__all__ = ["project_dynamics", "pull_dynamics"]


def project_dynamics(
    dynamics: torch.Tensor, value: torch.Tensor, grad: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Kolter & Manek's projection `F̃ = F − ∇V · ReLU(∇Vᵀ F + α V) / ‖∇V‖²`, per sample.

    Afterwards `∇Vᵀ F̃ = min(∇Vᵀ F, −α V) ≤ −α V`: along `ż = F̃(z)` the function `V` decays at
    least as fast as `e^{−αt}`. Only the component of `F` along `∇V`, and only where it would make `V`
    decay too slowly, is removed; elsewhere `F̃ = F`.

    Args:
        dynamics: `F(z)`, shape `(B, D)`.
        value: `V(z)`, shape `(B,)`.
        grad: `∇V(z)`, shape `(B, D)`.
        alpha: the decay rate `α > 0`.

    At the minimiser of `V` (`∇V = 0`, `V = 0`) the ratio is `0/0`; there the correction is defined
    as 0, its limit whenever `F` vanishes there too (the only well-posed case, see the concepts page).
    """
    excess = torch.relu((grad * dynamics).sum(dim=1) + alpha * value)
    norm2 = (grad * grad).sum(dim=1)
    # `where` on both the numerator and the denominator keeps the untaken branch finite, so its
    # gradient is 0 rather than NaN at ∇V = 0.
    safe = norm2 > torch.finfo(norm2.dtype).tiny
    scale = torch.where(safe, excess, torch.zeros_like(excess)) / torch.where(safe, norm2, torch.ones_like(norm2))
    return dynamics - grad * scale.unsqueeze(1)


def pull_dynamics(dynamics: torch.Tensor, grad: torch.Tensor, pull: float) -> torch.Tensor:
    """The balanced field `F − β ∇V`: the DEQ's dynamics plus a gradient descent on `V` of weight `β`.

    Its equilibria solve `f(z, x) − z = β ∇V(z)`: the injection, through `f`, balances the pull towards
    the minimiser of `V`. For a convex `V` the pull only adds contraction (`−β ∇²V ⪯ 0` in the Jacobian),
    so with a cell contractive in `z` the equilibrium is unique and globally exponentially stable.
    """
    return dynamics - pull * grad
