"""A linear system `A x = b` as a root problem for the shared loop: validation, residual, start and scale."""

from __future__ import annotations

import dataclasses

import torch

from ._precision import work_dtype
from ._protocol import MatVec, WritesInto

__all__ = ["LinearSystem", "linear_system"]


@dataclasses.dataclass(frozen=True)
class LinearSystem:
    """`A x = b` checked and posed as `R(x) = A x − b = 0`.

    Attributes:
        who: the solve's name and the solver's class, for messages.
        residual: `R`, counting nothing itself (the loop counts) and checking the matvec's shape.
        x0: the start (zero where `b = 0`: its exact solution, which a relative test could not reach).
        r0: `R(x0)` when it is known without a matvec (`−b` from a zero start), else `None`.
        scale: per sample ‖b‖ + tiny, the divisor of the relative measure (in the loop's norm dtype).
        matvec: the checked `A`.
    """

    who: str
    residual: WritesInto
    x0: torch.Tensor
    r0: torch.Tensor | None
    scale: torch.Tensor
    matvec: MatVec


def linear_system(solver: object, matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None, precond: torch.Tensor | None,
                  name: str) -> LinearSystem:
    """Validate `A x = b` for `solver` (`TypeError`/`ValueError` that name the argument: the arguments come from
    users, whatever their annotations say) and pose it as a root."""
    who = f"{name} ({type(solver).__name__})"
    if not callable(matvec):
        raise TypeError(f"{who}: matvec must be callable (B, D) -> (B, D), got {type(matvec).__name__}.")
    if not isinstance(b, torch.Tensor) or b.dim() != 2 or not b.is_floating_point():
        got = f"shape {tuple(b.shape)}, {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise TypeError(f"{who}: b must be a floating-point tensor of shape (B, D), got {got}.")
    for label, t, shapes in (("x0", x0, [b.shape]), ("precond", precond, [b.shape[1:], (1, b.shape[1]), b.shape])):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {label} must be a tensor or None, got {type(t).__name__}.")
        if tuple(t.shape) not in [tuple(s) for s in shapes]:
            raise ValueError(f"{who}: {label} has shape {tuple(t.shape)}; expected one of {[tuple(s) for s in shapes]}.")

    def checked(x: torch.Tensor) -> torch.Tensor:
        out = matvec(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{who}: matvec returned {got} for an input of shape {tuple(x.shape)}; it must return the same shape.")
        return out

    def residual(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sub(checked(x), b, out=out)

    b_norm = torch.linalg.vector_norm(b, dim=1, dtype=None if work_dtype(b.dtype) == b.dtype else work_dtype(b.dtype))
    scale = b_norm + torch.finfo(b_norm.dtype).tiny
    if x0 is None:
        start, r0 = torch.zeros_like(b), -b
    else:
        x0 = x0.to(b.dtype)  # a warm start in another dtype (e.g. float32 for a float64 system) starts the same solve
        start, r0 = torch.where((b_norm == 0)[:, None], 0.0, x0), None
    return LinearSystem(who=who, residual=WritesInto(residual), x0=start, r0=r0, scale=scale, matvec=checked)
