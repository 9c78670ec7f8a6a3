"""The public solver protocols: what `ImplicitLayer`, `fixed_point`/`root` and the IFT backward call.

A solver is anything with the right method; it need not subclass a class of this package:

- `Solver`: `solve(residual_fn, w0, ...) -> (w, SolveInfo)`, a nonlinear solve of `R(w) = 0`;
- `LinearSolver`: `solve_linear(matvec, b, x0, ...) -> (x, SolveInfo)`, a solve of `A x = b`;
- `IterativeMethod`: `init`/`step`/`release` on an `IterativeState`, for a method that lets the shared
  loop (`iterate`) do everything but the step: per-sample stopping and freezing, the best iterate,
  divergence and non-finite checks, the status of each sample, the trace and the failure policy.
  Subclassing `IterativeSolver` turns such a method into a `Solver` and a `LinearSolver`.

Unknowns are flat `(B, D)` batches; samples never interact. A residual function is called as `fn(w)`;
one wrapped in `WritesInto` is called as `fn(w, out=buffer)` where a solver has a buffer the result is
headed for (Anderson's history slot), which spares a copy per step.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, TypeVar, runtime_checkable

import torch

from ._info import SolveInfo

__all__ = ["ResidualFn", "MatVec", "WritesInto", "IterativeState", "IterativeMethod", "Solver", "LinearSolver", "is_solver"]

ResidualFn = Callable[[torch.Tensor], torch.Tensor]
"""`R: (B, D) -> (B, D)`, whose zero is the solution; sample `i` of the result depends on sample `i` only."""

MatVec = Callable[[torch.Tensor], torch.Tensor]
"""`x ↦ A x` for a batch `(B, D) -> (B, D)`, each sample with its own `A`."""


class WritesInto:
    """A residual function that can write `R(w)` into a buffer the solver names.

    `WritesInto(fn)` declares that `fn` accepts the keyword `out`: `fn(w, out=None)` returns `R(w)` in a
    new tensor, and `fn(w, out=buffer)` writes `R(w)` into the `(B, D)` `buffer` and returns it (e.g. with
    `torch.sub(w, f(w), out=out)`). A solver may pass `out` or not; the result must be the same. A plain
    function is never called with `out`.

    Args:
        fn: the residual function, `fn(w, out=None) -> R(w)`.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"WritesInto: fn must be callable, got {type(fn).__name__}.")
        self.fn = fn

    def __call__(self, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(w, out=out)


class IterativeState(Protocol):
    """What the loop reads from a method's state after every step.

    Attributes:
        w: the newest iterate, `(B, D)`. A step returns a new tensor here (never one it will later write
            into), because the loop may keep it as a sample's best iterate.
        r: its residual `R(w)`, `(B, D)`; may be `None` where `r_norm` is given (GMRES knows only the norm).
        r_norm: optional; the per-sample ‖R(w)‖ when the method has it for free (else absent or `None`).
            A non-finite norm ends the sample as non-finite (CG reports a breakdown so).
    """

    @property
    def w(self) -> torch.Tensor: ...
    @property
    def r(self) -> torch.Tensor | None: ...


S = TypeVar("S", bound=IterativeState)


@runtime_checkable
class IterativeMethod(Protocol[S]):
    """A method the shared loop drives (`implicitlayers.solvers._loop.iterate`).

    The loop reads the options `tol`, `max_iter`, `stop`, `on_failure`, `check_every` and `trace` (see
    `SolverConfig`), calls `init` once, `step` until every sample is frozen or `max_iter` steps ran, and
    `release` once the solve has ended (also after an error).
    """

    @property
    def tol(self) -> float: ...
    @property
    def max_iter(self) -> int: ...
    @property
    def stop(self) -> str: ...
    @property
    def on_failure(self) -> str: ...
    @property
    def check_every(self) -> int | None: ...
    @property
    def trace(self) -> bool: ...

    def init(self, fn: ResidualFn, w: torch.Tensor, r: torch.Tensor, precond: torch.Tensor | None, /) -> S:
        """The state at the start `w` with residual `r = fn(w)`; `precond` is the diagonal `P` (`(D,)` or `None`)."""
        ...

    def step(self, fn: ResidualFn, state: S, frozen: torch.Tensor | None, /) -> S:
        """One step. `frozen` is the `(B,)` mask of samples whose iterate must not change, or `None` when none is."""
        ...

    def release(self, state: S, /) -> None:
        """Hand reusable buffers back once the solve has ended."""
        ...


@runtime_checkable
class Solver(Protocol):
    """A nonlinear solver: what `ImplicitLayer(solver=...)`, `il.fixed_point` and `il.root` accept."""

    def solve(
        self,
        residual_fn: ResidualFn,
        w0: torch.Tensor,
        *,
        precond: torch.Tensor | None = None,
        name: str = "solve",
        hints: Mapping[str, str] | None = None,
        scale_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `R(w) = 0` per sample from `w0` (`(B, D)`); returns the solution and its `SolveInfo`.

        Args:
            residual_fn: `R`, called as `fn(w)` (or `fn(w, out=buffer)` if it is a `WritesInto`).
            w0: the start, `(B, D)`; never written into.
            precond: a diagonal preconditioner `P`, `(D,)`: Picard-type steps use `w − P ⊙ R(w)`.
            name: what is solved, for messages.
            hints: advice by failure cause for the failure message (see `apply_failure_policy`).
            scale_rows: the columns of `w` whose norm the relative stopping measure divides by (empty:
                absolute measure); `None` for all.
        """
        ...


@runtime_checkable
class LinearSolver(Protocol):
    """A linear solver: what `il.IFT(solver=...)` accepts for its adjoint solves."""

    def solve_linear(
        self,
        matvec: MatVec,
        b: torch.Tensor,
        x0: torch.Tensor | None = None,
        *,
        precond: torch.Tensor | None = None,
        name: str = "linear solve",
        hints: Mapping[str, str] | None = None,
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample; returns `x` (`(B, D)`) and its `SolveInfo`.

        The relative stopping measure of a linear solve is ‖A x − b‖ / ‖b‖ (`stop="rel"`).
        """
        ...


# Classes whose instances were found to be `Solver`s by their class's own `solve` method: the check of
# `isinstance(x, Solver)` (a runtime protocol) costs tens of µs, which a small solve would pay on every call.
_SOLVER_CLASSES: set[type] = set()


def is_solver(obj: object) -> bool:
    """`isinstance(obj, Solver)`, remembered per class when the class itself defines `solve`."""
    cls = type(obj)
    if cls in _SOLVER_CLASSES:
        return True
    found = isinstance(obj, Solver)
    if found and callable(getattr(cls, "solve", None)):
        _SOLVER_CLASSES.add(cls)
    return found
