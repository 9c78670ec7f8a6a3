"""How a block's solution is differentiated: exact implicit differentiation, phantom gradients, unrolling.

Each backward mode is an object that owns its differentiation. The layer hands a mode a
[`BlockSolve`][implicitlayers.backward.BlockSolve] — one compiled block, the tensors it reads, its start
and the forward solver — and the mode returns the block's solution as a tensor whose value is
(approximately) `w*` and whose gradient is the mode's:

- `IFT` solves without a graph, then attaches the implicit-function-theorem gradient;
- `Phantom` solves without a graph, then unrolls `k` damped steps from the solution;
- `Unroll` solves *with* the graph (backpropagation through the iterations).

A mode attaches a gradient only when something the block reads requires one: a block whose inputs
and parameters are all constants returns a plain tensor (no graph kept, no adjoint solve).

The IFT's machinery (its autograd functions and the adjoint linear systems) is in
`implicitlayers._ift`; support for `torch.func` transforms in `implicitlayers._transforms`.

**A failed backward solve.** The adjoint solve has its own failure policy, `IFT(on_failure=...)`
(default: the policy of the solver given to `IFT`, else `"warn"`; never the forward solver's). A sample whose adjoint solve did not converge gets a
**zero** gradient from this block (its wrong `λ` is dropped), so one failed sample cannot push garbage
into the parameters; the policy reports it.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ._ift import AdjointProblem, adjoint_solver, attach_ift
from ._transforms import active_transforms, tangents_may_flow, vmapped_solve
from .errors import ConvergenceWarning
from .solvers import LinearSolver, SolveInfo, apply_failure_policy
from .solvers._external import checked_external_result, is_own_solver
from .solvers._info import Status

if TYPE_CHECKING:
    from .system import BlockSystem, StepSizes

__all__ = ["IFT", "Phantom", "Unroll", "BackwardMode", "BlockSolve"]

_POLICIES = ("warn", "raise", "ignore")


@dataclasses.dataclass
class BlockSolve:
    """One block handed to a backward mode: what to solve, from where, and with what.

    Attributes:
        system: the compiled block (`R(w)`, packing, projections).
        outer: the tensors the block reads from outside (inputs, earlier blocks), with their graphs.
        w0: the packed start `(B, D)`.
        solver: the forward solver.
        precond: the block's diagonal preconditioner `(D,)` (`(B, D)` with per-sample steps), or `None`.
        report_backward: called with the `SolveInfo` of each backward (adjoint) solve of the block.
        steps: the per-sample steps of the block's `step_size="auto"` objectives
            (`BlockSystem.step_sizes`); estimated at `w0` when not given, and then fixed for the forward
            solve and every backward pass of this call (they enter `precond` and the residual).
    """

    system: "BlockSystem"
    outer: Mapping[str, torch.Tensor]
    w0: torch.Tensor
    solver: Any
    precond: torch.Tensor | None
    report_backward: Callable[[SolveInfo], None] | None = None
    steps: "StepSizes | None" = None

    def __post_init__(self) -> None:
        self.detached = {n: t.detach() for n, t in self.outer.items()}
        if self.steps is None and not active_transforms() & {"vmap"}:  # (a vmapped solve estimates its own)
            self.steps = self.system.step_sizes(self.w0, self.detached)
        if self.steps is not None:
            self.precond = self.system.preconditioner(self.w0, self.steps)
        # The caller's autocast, re-entered whenever the residual is evaluated later (in the backward pass,
        # which runs after the caller's `with torch.autocast(...)` block has closed).
        device = self.w0.device.type
        enabled = device in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device)
        self.autocast = (device, torch.get_autocast_dtype(device)) if enabled else None

    @property
    def name(self) -> str:
        return self.system.name

    def residual(self, w: torch.Tensor, *, graph: bool = True, theta: bool = True, equations_only: bool = False,
                 env: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`R(w)`; `graph` keeps the autograd graph; `theta` reads the outer tensors with their graphs
        (else detached, so that only `w` is differentiated); `env` replaces the outer tensors (a vmapped
        backward passes them folded into the batch)."""
        if env is None:
            env = self.outer if theta else self.detached
        if self.autocast is None:
            return self.system.residual(w, env, create_graph=graph, equations_only=equations_only, steps=self.steps)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            return self.system.residual(w, env, create_graph=graph, equations_only=equations_only, steps=self.steps)

    def forward_solve(self) -> tuple[torch.Tensor, SolveInfo]:
        """Solve the block without recording a graph; the constrained variables are projected onto their sets.

        Under `torch.func.vmap` the solve is one opaque operation whose vmapped dimension is folded into
        the batch dimension (samples are independent, so a vmapped solve is a bigger batch).
        """
        if active_transforms() & {"vmap"}:
            names = list(self.detached)
            infos: list[SolveInfo] = []

            def solve(w0: torch.Tensor, *outer: torch.Tensor) -> torch.Tensor:
                w, info = self._solve_plain(w0, dict(zip(names, outer)))
                infos.append(info)
                return w

            w_star = vmapped_solve(solve, self.w0.detach(), *self.detached.values())
            return w_star, infos[-1]
        return self._solve_plain(self.w0.detach(), self.detached)

    def subset(self, rows: torch.Tensor) -> "BlockSolve":
        """The same block for the samples `rows` only (samples never interact, so their solutions are unchanged)."""
        per_sample = self.precond is not None and self.precond.dim() == 2
        return BlockSolve(
            self.system, {n: t.index_select(0, rows) for n, t in self.outer.items()}, self.w0.index_select(0, rows),
            self.solver, self.precond.index_select(0, rows) if per_sample else self.precond, self.report_backward,
            None if self.steps is None else self.steps.subset(rows),
        )

    def solve_options(self) -> dict[str, Any]:
        """Keyword arguments of the solver's `solve` for this block: a block with objectives is measured
        (`scale_rows`, see `BlockSystem.relative_rows`) and advised (`hints`) as one."""
        if not self.system.objectives:
            return {}
        return {"scale_rows": self.system.relative_rows(self.w0.device), "hints": self.system.failure_hints()}

    def _solve_plain(self, w0: torch.Tensor, env: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, SolveInfo]:
        steps, precond = self.steps, self.precond
        if steps is None:  # inside vmap, on the folded batch (forward only)
            steps = self.system.step_sizes(w0, env)
            precond = precond if steps is None else self.system.preconditioner(w0, steps)
        with torch.no_grad():
            options = self.solve_options()
            w_star, info = self.solver.solve(
                lambda w: self.system.residual(w, env, steps=steps), w0, precond=precond, name=self.name, **options,
            )
            if not is_own_solver(self.solver):  # a user's solver: its output is validated and its claims measured
                w_star, info = checked_external_result(
                    self.solver, lambda w: self.system.residual(w, env, steps=steps), w0, w_star, info, self.name,
                    scale_rows=options.get("scale_rows"), hints=options.get("hints"),
                )
            w_star = self.system.project_constrained(w_star)
            if self.system.objectives and not self.system.equations:
                info = self._flag_non_optima(w_star, info, env)
            return w_star, info

    def _flag_non_optima(self, w: torch.Tensor, info: SolveInfo, env: Mapping[str, torch.Tensor]) -> SolveInfo:
        """Converged samples that are stationary but not optimal (`Status.NOT_OPTIMAL`), reported as failed.

        A root of the gradient may be a maximum or a saddle point, and Anderson and Broyden (root finders)
        can converge to one. For each unconstrained objective of a block without equations (its
        stationarity alone defines the variable):

        - a variable of at most `EXACT_CURVATURE_MAX_DIM` entries a sample: its Hessian (of the signed
          objective: a `Maximize` is minimised negated), from that many Hessian–vector products, has a
          negative eigenvalue beyond rounding. Exact: every saddle is found, whatever its one direction
          of descent;
        - a larger variable, or an objective without second derivatives: the objective is lower on *both*
          sides of the sample along a random direction. Three evaluations, no derivative; a saddle is found
          when the direction has negative curvature.
        """
        converged = info.converged
        if not bool(converged.any()):
            return info
        values = self.system.unpack(w)
        scope = {**env, **values}
        bad = torch.zeros_like(converged)
        eps = torch.finfo(w.dtype).eps
        for cond in self.system.objectives:
            if cond.constraint is not None:
                continue
            name = cond.variable.name
            v = values[name]
            gen = torch.Generator(device=v.device).manual_seed(0)  # reproducible: the same probe every call
            d = torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype)
            dims = tuple(range(1, v.dim()))
            d = d / torch.linalg.vector_norm(d, dim=dims, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
            # A step well above rounding of v, small enough that the objective is near quadratic.
            h = eps**0.25 * torch.linalg.vector_norm(v, dim=dims, keepdim=True).clamp_min(1.0)

            def signed(at: torch.Tensor) -> torch.Tensor:
                return cond.sign * self.system.objective_value(cond, {**scope, name: at})

            lowest = _lowest_curvature(signed, v) if v[0].numel() <= EXACT_CURVATURE_MAX_DIM else None
            if lowest is not None:
                bad |= lowest
                continue
            centre, plus, minus = signed(v), signed(v + h * d), signed(v - h * d)
            margin = 64 * eps * centre.abs().clamp_min(1.0)
            bad |= (plus < centre - margin) & (minus < centre - margin)
        flagged = bad & converged
        if not bool(flagged.any()):
            return info
        status = torch.where(flagged, int(Status.NOT_OPTIMAL), info.status)
        info = dataclasses.replace(info, converged=converged & ~flagged, status=status)
        only_new = dataclasses.replace(info, converged=~flagged)
        apply_failure_policy(
            only_new, name=self.name, tol=getattr(self.solver, "tol", float("nan")),
            max_iter=getattr(self.solver, "max_iter", 0), on_failure=getattr(self.solver, "on_failure", "warn"),
        )
        return info

    def reads_grad(self, w_star: torch.Tensor) -> bool | None:
        """Whether the block's solution depends on anything that requires a gradient.

        `True` when an outer tensor or a constraint set's tensor requires grad. Otherwise only the user's functions can tell (they
        may capture parameters): a block with objectives evaluates them once at `w*` (its residual
        always carries a graph through the objective's internal VJP, so it cannot tell); for a block of
        equations only, `None` means "look at whether `R(w*)` requires grad", which costs nothing extra.
        """
        transforms = active_transforms()
        if "vmap" in transforms and not transforms & {"grad", "jvp"}:
            if torch.is_grad_enabled() and self.system.reads_grad(w_star, self.outer):
                raise NotImplementedError(
                    f"{self.name}: gradients through torch.func.vmap over an implicit layer are not supported yet "
                    "(vmapped solves run forward only). Call the layer on the whole batch instead: samples are "
                    "independent, so its batch dimension is already per sample; or run vmap under torch.no_grad()."
                )
            return False
        if transforms or torch.autograd.forward_ad._current_level >= 0:
            return True  # forward mode or a torch.func transform: requires_grad does not tell
        if not torch.is_grad_enabled():
            return False
        if any(t.requires_grad for t in self.outer.values()):
            return True
        if not self.system.objectives:
            return None
        # A constraint set's bounds or centre may be learnable: the projection differentiates into them.
        if any(t.requires_grad for c in self.system.objectives if c.constraint is not None for t in c.constraint.tensors().values()):
            return True
        return self.system.reads_grad(w_star, self.outer)


class BackwardMode(abc.ABC):
    """What every backward mode does: solve a block and return its differentiable solution.

    Subclasses implement `attach(block, w_star) -> Tensor` (the value of `w_star`, the mode's gradient);
    a mode that must see the solver's iterations overrides `solve` instead.
    """

    def solve(self, block: BlockSolve) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `block` and return its packed solution (differentiable when something requires grad) and `SolveInfo`."""
        w_star, info = block.forward_solve()
        if block.reads_grad(w_star) is False:
            return w_star, info
        return self.attach(block, w_star), info

    @abc.abstractmethod
    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:
        """The differentiable solution: the value of `w_star` with this mode's gradient."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class IFT(BackwardMode):
    """Exact implicit differentiation of the whole block.

    Args:
        solver: solver of the adjoint linear system `Aᵀ λ = g`: any `il.linear` solver or fixed-point
            solver. Default: for a block of at most 16 unknowns a sample, an exact dense solve (`Aᵀ` from
            one batched VJP, then `torch.linalg.solve`; `backward_info` shows one step and `D` products);
            for larger blocks (or a residual whose VJP cannot be batched) the forward solver's type and
            options, with at least 100 iterations.
        first_order: treat optimised variables (`Minimize`/`Maximize`) as constants and differentiate only
            the block's equations, as the JIIO reference code does. Exact when the outer loss is the
            inner objective (envelope theorem), an approximation otherwise.
        second_order: prepare exact double backward (`create_graph=True`, e.g. gradient penalties);
            costs two more residual evaluations and one JVP per forward. Without it, double
            backward through the IFT raises `NotImplementedError` rather than returning a wrong value.
        on_failure: what a backward solve that did not converge does: `"warn"` (`il.ConvergenceWarning`),
            `"raise"` (`il.ConvergenceError`) or `"ignore"`. `None` (default) takes the policy of the
            `solver` you passed here, else `"warn"`: never the forward solver's, so a forward run with
            `on_failure="ignore"` still reports failed backward solves. Whatever the policy, a failed
            sample's gradient from this block is zero.
    """

    solver: Any = None
    first_order: bool = False
    second_order: bool = False
    on_failure: str | None = None

    def __post_init__(self) -> None:
        if self.solver is not None and not isinstance(self.solver, LinearSolver):
            raise TypeError(
                f"IFT: solver must be an il.linear solver or a fixed-point solver (il.Anderson, il.Broyden, ...), got {self.solver!r}."
            )
        for flag in ("first_order", "second_order"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"IFT: {flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.on_failure is not None and self.on_failure not in _POLICIES:
            raise ValueError(f"IFT: on_failure must be None or one of {_POLICIES}, got {self.on_failure!r}.")

    @property
    def failure_policy(self) -> str:
        """The backward's effective failure policy (see `on_failure`)."""
        if self.on_failure is not None:
            return self.on_failure
        return getattr(self.solver, "on_failure", "warn") if self.solver is not None else "warn"

    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:
        system = block.system
        solver = adjoint_solver(self, block.solver)
        if self.first_order and system.objectives:
            if not system.equations:
                return w_star  # optimised variables only: constants by definition of first_order
            idx = system.equation_indices(w_star.device)

            def embed(w_eq: torch.Tensor) -> torch.Tensor:
                return w_star.detach().index_copy(1, idx, w_eq)

            adjoint = AdjointProblem(
                residual=lambda w_eq: block.residual(embed(w_eq), theta=False, equations_only=True),
                w_star=w_star[:, idx], solver=solver, precond=None if block.precond is None else block.precond[..., idx],
                name=block.name, warm_start=system.dual_warm_start(w_star, idx), second_order=self.second_order,
                on_failure=self.failure_policy, report=block.report_backward,
            )
            out_eq = attach_ift(lambda w_eq: block.residual(embed(w_eq), equations_only=True), w_star[:, idx], adjoint)
            if out_eq is None:
                return w_star
            return w_star.detach().index_copy(1, idx, out_eq)
        warm = system.dual_warm_start(w_star, system.equation_indices(w_star.device)) if system.equations else None
        adjoint = AdjointProblem(
            residual=lambda w: block.residual(w, theta=False), w_star=w_star, solver=solver, precond=block.precond,
            name=block.name, second_order=self.second_order, warm_start=warm, on_failure=self.failure_policy,
            report=block.report_backward, outer=block.detached,
            residual_in=lambda w, env: block.residual(w, theta=False, env=env),
        )
        out = attach_ift(lambda w: block.residual(w), w_star, adjoint)
        return w_star if out is None else out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phantom(BackwardMode):
    """Phantom gradient: unroll `k` damped steps of the map `F` from the detached solution.

    `k=1` is Jacobian-free backpropagation. Cheap and approximate; approaches the IFT as `k` grows
    (for `damping` small enough that the damped map contracts).
    """

    k: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Phantom: k must be an integer >= 1, got {self.k!r}.")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"Phantom: damping must lie in (0, 1], got {self.damping!r}.")

    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:
        """`k` damped steps of the block's map from the detached `w*`, recorded by autograd.

        The output is that last step (as in torchdeq's phantom gradient, and what the random intermediate
        states of `implicitlayers.robust` train through): for a converged sample it agrees with `w*` to the
        solver's tolerance; for a failed one (reported in its `SolveInfo`) it can move away. Without anything
        that requires grad the output is `w*`. A sample whose steps turn non-finite gets `w*`, no gradient,
        and does not make the other samples' shared gradients NaN (its NaN would multiply their zero
        cotangents in every shared operation).
        """
        w, first = self._steps(block, w_star)
        if w is w_star:
            return w_star
        finite = torch.isfinite(w.detach()).all(1)
        if not bool(finite.all()):
            keep = finite.nonzero()[:, 0]
            w_keep, _ = self._steps(block.subset(keep), w_star.index_select(0, keep))
            w = w_star.detach().index_copy(0, keep, w_keep)
        self._check_contraction(block, w_star, first, w, finite)
        return w

    def _steps(self, block: BlockSolve, w_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`k` damped steps of the block's map from the detached `w*`, and the first of them (`w*` itself,
        twice, when nothing requires grad)."""
        w = first = w_star
        for j in range(self.k):
            r = block.residual(w)
            if not r.requires_grad and not tangents_may_flow():  # nothing upstream requires grad
                return w_star, w_star
            w = w - self.damping * (r if block.precond is None else r * block.precond)
            if j == 0:
                first = w
        return w, first

    def _check_contraction(self, block: BlockSolve, w_star: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                           finite: torch.Tensor) -> None:
        """Warn when the damped map visibly expands at `w*`: then the phantom gradient is not an approximation
        of the implicit one (on `z = 1.5 z + x` it was 7e10 for −2), however well the forward converged.

        A map that does not expand moves each step by at most its first, so `k` steps stay within `k` times
        the first step's length; beyond twice that (plus rounding) the steps grew. (A forward solved to the
        last bit leaves no first step to amplify, and shows nothing.)
        """
        with torch.no_grad():
            w0 = w_star.detach()
            d1 = torch.linalg.vector_norm(first.detach() - w0, dim=1)
            dk = torch.linalg.vector_norm(last.detach() - w0, dim=1)
            rounding = 64 * torch.finfo(w0.dtype).eps * (1 + torch.linalg.vector_norm(w0, dim=1))
            grew = finite & (dk > 2 * self.k * d1 + self.k * rounding)
            if not bool(grew.any()):
                return
            i = int(grew.nonzero()[0, 0])
        warnings.warn(
            f"Phantom backward of {block.name}: the {self.k} damped steps (damping {self.damping}) moved {int(grew.sum())} "
            f"sample(s) away from the solution instead of settling (sample {i}: first step {float(d1[i]):.2e}, after "
            f"{self.k} steps {float(dk[i]):.2e}): the damped map expands there, so the phantom gradient does not "
            "approximate the implicit one. Lower damping, or use il.IFT().",
            ConvergenceWarning, stacklevel=4,
        )


@dataclasses.dataclass(frozen=True)
class Unroll(BackwardMode):
    """Backpropagate through every solver iteration (memory grows with the iterations; for testing and
    weight-tied networks).

    The gradient is the derivative of the iterations taken, not the implicit one. Under Picard iteration
    it tends to the implicit gradient as the iterates converge. Anderson's mixing weights and Broyden's
    secant updates depend on the iterates too, and their derivatives stay in it: even at a converged
    solution it can differ from the implicit gradient by percents (on `z = w·z + x` in float64 solved
    to 1e-13: 0.8–2 % with Anderson, 24–60 % with Broyden), and far more once Anderson iterates at the
    dtype's rounding floor. Train with `IFT`; compare against `Unroll` with `FixedPointIteration`.

    A sample that already meets the tolerance at its start runs no iteration; it is still
    differentiated through one step of the block's map `F(w) = w − P ⊙ R(w)` from its start, so its
    gradient is the one-step unrolled gradient, never a silent zero. A sample whose iterates turned
    non-finite gets no gradient, and does not make the other samples' shared gradients NaN.
    """

    def solve(self, block: BlockSolve) -> tuple[torch.Tensor, SolveInfo]:
        if not torch.is_grad_enabled() or block.reads_grad(block.w0) is False:
            return block.forward_solve()
        w_out, info = self._unrolled(block)
        broken = info.status == int(Status.NONFINITE)
        if bool(broken.any()):
            # Backpropagating through a batch in which one sample turned NaN multiplies NaN by the other
            # samples' zero cotangents in every shared operation, so a shared parameter's gradient would be
            # NaN for all. Unroll the finite samples again without it; the broken ones get no gradient.
            keep = (~broken).nonzero()[:, 0]
            w_keep, _ = self._unrolled(block.subset(keep))
            w_out = w_out.detach().index_copy(0, keep, w_keep)
        return w_out, info

    def _unrolled(self, block: BlockSolve) -> tuple[torch.Tensor, SolveInfo]:
        w_out, info = block.solver.solve(
            lambda w: block.residual(w), block.w0, precond=block.precond, name=block.name, **block.solve_options()
        )
        w_out = block.system.project_constrained(w_out)
        if block.system.objectives and not block.system.equations:  # as `forward_solve` does: a maximum or a
            with torch.no_grad():  # saddle is reported, not returned as a converged minimum
                info = block._flag_non_optima(w_out.detach(), info, block.detached)
        idle = info.nstep == 0
        if bool(idle.any()):
            # w_out is the (constant) start for these samples: take one differentiable step from it.
            r = block.residual(w_out)
            stepped = w_out - (r if block.precond is None else r * block.precond)
            stepped = block.system.project_constrained(stepped)
            w_out = torch.where(idle[:, None], stepped, w_out)
        return w_out, info

    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:  # pragma: no cover - solve overrides
        raise NotImplementedError("Unroll differentiates the solver's iterations; see Unroll.solve.")




# Optimised variables of at most this many entries a sample are checked for saddle points by their exact
# Hessian (that many Hessian-vector products, once per solve); larger ones by a random probe.
EXACT_CURVATURE_MAX_DIM = 32


def _lowest_curvature(signed: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> torch.Tensor | None:
    """Per sample, whether the Hessian of `signed` (`(B,)` from `(B, ...)`) at `v` has a negative eigenvalue
    beyond rounding (`(B,)` bool); `None` when the objective has no second derivative autograd can take."""
    batch, n = v.shape[0], v[0].numel()
    try:
        with torch.enable_grad():
            x = v.detach().requires_grad_()
            (g,) = torch.autograd.grad(signed(x).sum(), x, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:  # linear in v: no curvature, no saddle
                return torch.zeros(batch, dtype=torch.bool, device=v.device)
            probe = torch.zeros_like(x).reshape(batch, n)
            columns = []
            for j in range(n):
                probe.zero_()[:, j] = 1  # (each sample's Hessian in one product: samples are independent)
                (hv,) = torch.autograd.grad(g, x, probe.reshape(x.shape), retain_graph=j < n - 1, allow_unused=True)
                columns.append(torch.zeros_like(probe) if hv is None else hv.detach().reshape(batch, n))
    except RuntimeError:  # an operation without a double backward
        return None
    hessian = torch.stack(columns, 2)
    hessian = (hessian + hessian.mT) / 2
    # A failed sample's NaN Hessian would make the batched eigensolver raise: it is not judged here (it failed).
    finite = torch.isfinite(hessian).flatten(1).all(1)
    hessian = torch.where(finite[:, None, None], hessian, torch.zeros_like(hessian))
    eigenvalues = torch.linalg.eigvalsh(hessian.double() if hessian.dtype in (torch.float16, torch.bfloat16) else hessian)
    scale = eigenvalues.abs().amax(1).clamp_min(1.0)
    # A negative eigenvalue beyond the rounding of the products (√eps of the largest): descent exists there.
    return eigenvalues[:, 0] < -(torch.finfo(v.dtype).eps ** 0.5) * scale
