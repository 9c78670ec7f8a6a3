"""Shared pieces of the attacks: argument checks, ε-ball geometry, and the eval-mode context."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Iterator, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Clamp",
    "Classifier",
    "LossFn",
    "Norm",
    "ascent_direction",
    "check_batch",
    "check_clamp",
    "check_eps",
    "check_logits",
    "check_norm",
    "check_positive_int",
    "check_step_size",
    "cross_entropy_per_sample",
    "eval_mode",
    "input_gradient",
    "project",
    "uniform_in_ball",
]

Norm = Literal["linf", "l2"]
Clamp = Optional[Tuple[float, float]]
Classifier = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default attack loss: cross-entropy of each sample, shape `(B,)`."""
    return F.cross_entropy(logits, y, reduction="none")


# ---------------------------------------------------------------- argument checks


def check_norm(norm: object, who: str) -> str:
    if norm not in ("linf", "l2"):
        raise ValueError(f"{who}: unknown norm {norm!r}; norm must be 'linf' or 'l2'.")
    return norm  # type: ignore[return-value]


def check_eps(eps: object, who: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{who}: eps must be a number (the radius of the attack ball), got {type(eps).__name__}.")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{who}: eps must be a finite number >= 0 (the radius of the attack ball), got {eps}.")
    return float(eps)


def check_positive_int(value: object, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}.")
    return value


def check_step_size(step_size: object, who: str) -> float:
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real):
        raise TypeError(f"{who}: step_size must be a number or None, got {type(step_size).__name__}.")
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"{who}: step_size must be a finite number > 0, got {step_size}.")
    return float(step_size)


def check_batch(x: object, y: object, who: str) -> torch.Tensor:
    """`x` is a floating `(B, ...)` tensor and `y`, when it is a tensor, has the same batch size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor of shape (B, ...), got {type(x).__name__}.")
    if x.dim() < 1:
        raise ValueError(f"{who}: x must have a leading batch dimension, got a 0-d tensor.")
    if not x.is_floating_point():
        raise TypeError(f"{who}: x must be a floating-point tensor (the attack moves it continuously), got {x.dtype}.")
    if isinstance(y, torch.Tensor) and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        got = "a 0-d tensor" if y.dim() == 0 else f"{y.shape[0]} samples (shape {tuple(y.shape)})"
        raise ValueError(
            f"{who}: x has {x.shape[0]} samples (shape {tuple(x.shape)}) but y has {got}; they must match."
        )
    return x


def check_clamp(clamp: object, x: torch.Tensor, who: str) -> Clamp:
    """`x` is finite; `clamp` is `None` or `(lo, hi)` with `lo < hi`, and the clean `x` lies inside it.

    The second condition is what keeps the attack inside its ε-ball: clamping moves a coordinate
    towards the box, hence towards `x`, only when `x` itself is in the box.
    """
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        # NaN passes every comparison with the box; an attack from a NaN input is a NaN "adversarial example".
        raise ValueError(f"{who}: x has non-finite values (NaN or inf); attack clean, finite inputs.")
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"{who}: clamp must be None or a pair (lo, hi), got {clamp!r}.")
    lo, hi = (float(c) for c in clamp)
    if not lo < hi:
        raise ValueError(f"{who}: clamp=(lo, hi) needs lo < hi, got {clamp!r}.")
    if x.numel() and (x.min() < lo or x.max() > hi):
        raise ValueError(
            f"{who}: x has values in [{x.min().item():.4g}, {x.max().item():.4g}], outside clamp=({lo}, {hi}). "
            "Pass the range of your data as clamp, or clamp=None for unbounded inputs."
        )
    return (lo, hi)


def check_logits(logits: object, batch: int, who: str, name: str = "model") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{who}: {name}(x) must return a tensor of logits, got {type(logits).__name__}.")
    if logits.dim() < 1 or logits.shape[0] != batch:
        raise ValueError(
            f"{who}: {name}(x) returned shape {tuple(logits.shape)} for a batch of {batch}; "
            "it must return logits of shape (B, ...)."
        )
    return logits


# ---------------------------------------------------------------- ε-ball geometry (per sample)


def _flat_norms(v: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each sample over all its non-batch dimensions, shaped to broadcast against `v`."""
    norms = v.reshape(v.shape[0], -1).norm(dim=1)
    return norms.reshape((-1,) + (1,) * (v.dim() - 1))


def _tiny(v: torch.Tensor) -> float:
    return torch.finfo(v.dtype).tiny


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit `norm`: `sign(g)` for ℓ∞, `g/‖g‖₂` per sample for ℓ2.

    A zero gradient gives a zero step rather than NaN.
    """
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norms(grad).clamp_min(_tiny(grad))


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str, clamp: Clamp) -> torch.Tensor:
    """Project `x_adv` onto the ε-ball around `x` (per sample), then onto the clamp box.

    For ℓ∞ the two sets are boxes, so this is the exact projection onto their intersection; for ℓ2 the
    box step only moves coordinates towards `x` (which lies in the box), so the result stays in the ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norms(delta).clamp_min(_tiny(delta))).clamp(max=1.0)
    out = x + delta
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out.detach()


def uniform_in_ball(
    x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """A perturbation drawn uniformly from the ε-ball: the ℓ∞ box, or the ℓ2 ball of each sample."""
    kw = dict(dtype=x.dtype, device=x.device, generator=generator)
    if norm == "linf":
        return (2 * torch.rand(x.shape, **kw) - 1) * eps
    # A Gaussian direction is uniform on the sphere; radius ∝ U^(1/d) makes the point uniform in the ball.
    direction = torch.randn(x.shape, **kw)
    direction = direction / _flat_norms(direction).clamp_min(_tiny(direction))
    d = max(x[0].numel(), 1)
    radius = eps * torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), **kw) ** (1.0 / d)
    return direction * radius


# ---------------------------------------------------------------- gradients and modes


def input_gradient(
    objective: Callable[[torch.Tensor], torch.Tensor], x_adv: torch.Tensor, who: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(∂ objective.sum() / ∂x_adv, objective(x_adv).detach())`.

    Differentiates with respect to the input only (`torch.autograd.grad`), so no `.grad` is accumulated
    in the model's parameters, and works even when the caller is inside `torch.no_grad()`.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = objective(x_adv)
        total = loss.sum()
        grad = None
        if total.requires_grad:
            (grad,) = torch.autograd.grad(total, x_adv, allow_unused=True)
    if grad is None:
        raise RuntimeError(
            f"{who}: the attack loss does not depend on x through autograd, so there is no input gradient. "
            "The model's forward must be differentiable with respect to its input: for an implicit layer use a "
            "backward mode (IFT, Phantom, Unroll), and do not run the forward solve under torch.no_grad()."
        )
    return grad, loss.detach()


def _modules_of(fn: object) -> Iterator[nn.Module]:
    if isinstance(fn, nn.Module):
        yield fn
    elif isinstance(getattr(fn, "__self__", None), nn.Module):  # a bound method such as deq.unrolled
        yield fn.__self__  # type: ignore[attr-defined]


@contextlib.contextmanager
def eval_mode(*fns: object) -> Iterator[None]:
    """Put every `nn.Module` among `fns` (or owning a bound method among them) in eval mode, then restore.

    Each submodule's own flag is restored, so a model with, say, a frozen batch norm inside a training
    model comes back exactly as it was. Plain callables are called as they are.
    """
    modules = []
    for fn in fns:
        for module in _modules_of(fn):
            if all(module is not m for m in modules):
                modules.append(module)
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        # Pre-order: a parent's train() recurses into its children, which then reset their own flags.
        for m, training in saved:
            m.train(training)
