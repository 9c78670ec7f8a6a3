"""A block of a problem compiled into one packed residual `R(w)` (and map `F(w) = w − P ⊙ R(w)`).

The block's unknown `w` is a flat `(B, D)` tensor packing, in order, the block's variables and the
adjoint variables of its total objectives. For a total `Minimize(v, L)` with equations
`c_e(E, v) = 0` in the block (`c = z − f` for a fixed point, `c = g` for a root), the adjoints
`μ` (one per equation variable) and the stationarity conditions are the KKT system

    R_μ = (∂c/∂E)ᵀ μ − ∂L/∂E          (for c = z − f:  μ − J_zᵀ μ − ∂L/∂z)
    R_v = ∂L/∂v − (∂c/∂v)ᵀ μ          (for c = z − f:  ∂L/∂v + J_vᵀ μ)

both read off one vector–Jacobian product of `φ = Σ_e ⟨μ_e, c_e⟩ − L`: `R_μ = ∇_E φ`, `R_v = −∇_v φ`.
A constraint set replaces `R_v` by the gradient mapping `(v − Π(v − α R_v)) / α` (`R_v` itself wherever
the set is inactive, so a constraint that never binds leaves the stopping test as it was), its natural
residual computed by the set without cancellation (`ConstraintSet.natural_residual`): as a plain
difference it rounds to 0 far out along an unbounded direction and would report a point far from the
solution as converged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch

from .problem import Condition, FixedPoint, Minimize, Problem

__all__ = ["Slot", "BlockSystem", "StepSizes"]

# Power iterations of the curvature estimate of a `step_size="auto"` objective. Each is one Hessian–vector
# product (a double backward through the objective) for an objective whose curvature is its own Hessian;
# for a total objective of a block with equations (a KKT block, e.g. JIIO) each is one more evaluation of
# the block's residual, which also relaxes the equations' linear response to the direction: the response
# builds up at the equations' contraction rate, so the KKT estimate needs more (measured on a linear cell
# of norm 0.5: 12 iterations reach half the curvature, 20 reach 98%).
POWER_ITERATIONS = 8
KKT_POWER_ITERATIONS = 20


@dataclasses.dataclass(frozen=True)
class StepSizes:
    """The per-sample steps `α = 1 / λ` of a block's `step_size="auto"` objectives, fixed for one solve.

    Attributes:
        values: `(B, 1)` step of each such objective, by variable name.
        curvature: `(B,)` the estimated largest curvature `λ` (absolute eigenvalue) of each; a sample
            whose estimate is zero or not finite gets `α = 1`.
        products: Hessian–vector products (or, for a KKT block, residual evaluations) spent on the
            estimate, each over the whole batch.
    """

    values: dict[str, torch.Tensor]
    curvature: dict[str, torch.Tensor]
    products: int

    def subset(self, rows: torch.Tensor) -> "StepSizes":
        """The same steps for the samples `rows` only."""
        return StepSizes(
            {n: a.index_select(0, rows) for n, a in self.values.items()},
            {n: c.index_select(0, rows) for n, c in self.curvature.items()},
            self.products,
        )

    def step_of(self, cond: Minimize, like: torch.Tensor) -> torch.Tensor | float:
        """`cond`'s step, shaped to broadcast against its variable `like` `(B, ...)`."""
        alpha = self.values.get(cond.variable.name)
        if alpha is None:
            return cond.fixed_step
        return alpha.to(like.dtype).reshape((like.shape[0],) + (1,) * (like.dim() - 1))


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one variable (or adjoint) lives in the packed unknown."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    damping: float


class BlockSystem:
    """One block of a `Problem`, compiled for the given sample shapes of its variables.

    Args:
        problem: the validated problem.
        index: which block.
        shapes: per-sample shape of every variable of the block (without the batch dimension).
    """

    def __init__(self, problem: Problem, index: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.index = index
        self.names = list(problem.blocks[index])
        self.name = f"block {index} ({', '.join(self.names)})"
        self.conditions: list[Condition] = [problem.conditions[n] for n in self.names]
        self.equations = [c for c in self.conditions if c.is_equation]
        self.objectives = [c for c in self.conditions if not c.is_equation]
        block_set = set(self.names)
        eq_names = {c.variable.name for c in self.equations}
        # A total objective needs adjoints when it reads, directly, an equation variable of this block.
        self.total_objectives = [
            c for c in self.objectives if c.total and self.equations and any(a.name in eq_names for a in c.args)
        ]
        slots: list[Slot] = []
        offset = 0

        def add(name: str, shape: tuple[int, ...], damping: float) -> None:
            nonlocal offset
            size = math.prod(shape)
            slots.append(Slot(name, tuple(shape), offset, size, damping))
            offset += size

        for cond in self.conditions:
            name = cond.variable.name
            if isinstance(cond, Minimize) and cond.constraint is not None:
                cond.constraint.check_shape(tuple(shapes[name]), f"{type(cond).__name__}({name}) in {self.name}")
            if isinstance(cond, Minimize):
                # An "auto" step is per sample: `preconditioner(like, steps)` fills it in at each solve. A
                # constrained variable's residual is the gradient mapping (v − Π(v − α∇)) / α, so with this
                # step its map is the projected step v ← Π(v − α∇), as an unconstrained one's is v ← v − α∇.
                damping = cond.fixed_step
            else:
                damping = cond.damping
            add(name, tuple(shapes[name]), damping)
        for obj in self.total_objectives:
            for eq in self.equations:
                add(self.adjoint_name(obj, eq), tuple(shapes[eq.variable.name]), obj.adjoint_damping)
        self.slots = {s.name: s for s in slots}
        self.conditions_by_name = {c.variable.name: c for c in self.conditions}
        self.dim = offset
        self.reads = sorted({a.name for c in self.conditions for a in c.args} - block_set)
        self.equation_slots = [self.slots[c.variable.name] for c in self.equations]
        self._relative_rows: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def adjoint_name(objective: Condition, equation: Condition) -> str:
        """The name of the adjoint of `equation` for `objective` (shown in `Solution.duals`)."""
        return f"mu[{objective.variable.name}|{equation.variable.name}]"

    # ----------------------------------------------------------------------------- packing
    def pack(self, values: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Flatten the named `(B, ...)` tensors into `(B, D)`; missing adjoints start at zero."""
        parts = []
        ref = next(iter(values.values()))
        for slot in self.slots.values():
            value = values.get(slot.name)
            if value is None:
                value = ref.new_zeros((batch, slot.size))
            parts.append(value.reshape(batch, slot.size))
        return torch.cat(parts, dim=1)

    def unpack(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named `(B, ...)` views of a packed `(B, D)` tensor."""
        batch = w.shape[0]
        views = {}
        for s in self.slots.values():
            view = w[:, s.offset : s.offset + s.size]
            # A flat slot's column slice already has its shape: skip the reshape (this runs every evaluation).
            views[s.name] = view if len(s.shape) == 1 else view.reshape((batch, *s.shape))
        return views

    def preconditioner(self, like: torch.Tensor, steps: "StepSizes | None" = None) -> torch.Tensor | None:
        """The diagonal `P` of the map `F(w) = w − P ⊙ R(w)`: `(D,)`, or `None` when it is all ones; with
        per-sample `steps` (of `step_size="auto"` objectives, see `step_sizes`) it is `(B, D)`."""
        per_sample = {} if steps is None else dict(steps.values)
        if not per_sample:
            if all(s.damping == 1.0 for s in self.slots.values()):
                return None
            return torch.cat([like.new_full((s.size,), s.damping) for s in self.slots.values()])
        batch = like.shape[0]
        parts = [
            per_sample[s.name].to(like.dtype).expand(batch, s.size) if s.name in per_sample else like.new_full((batch, s.size), s.damping)
            for s in self.slots.values()
        ]
        return torch.cat(parts, 1)

    def project_constrained(self, w: torch.Tensor) -> torch.Tensor:
        """`w` with each constrained variable projected onto its set.

        Anderson and Broyden return extrapolated mixes of projected points, feasible only up to rounding;
        the projection makes the returned solution feasible exactly (and is the identity at a fixed point).
        """
        constrained = [c for c in self.objectives if c.constraint is not None]
        if not constrained:
            return w
        parts = dict(self.unpack(w))
        for cond in constrained:
            parts[cond.variable.name] = cond.constraint.project(parts[cond.variable.name])
        return self.pack(parts, w.shape[0])

    def relative_rows(self, device: torch.device) -> torch.Tensor | None:
        """The columns a relative stopping test divides by: every row but the optimised variables'.

        An equation's residual (`z − f(z)`, an adjoint equation) is measured in units of its variable, so
        relating it to ‖w‖ is meaningful; an objective's residual is a (projected) gradient, which is not
        (a start far out along a flat or unbounded direction would pass). `None` when every row counts; an
        empty selection (a block of objectives only) makes the test absolute.
        """
        if not self.objectives:
            return None
        cached = self._relative_rows.get(device)
        if cached is None:  # built once per device: it is read by every solve of the block
            optimised = {c.variable.name for c in self.objectives}
            rows = [torch.arange(s.offset, s.offset + s.size, device=device) for s in self.slots.values() if s.name not in optimised]
            cached = self._relative_rows[device] = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=device)
        return cached

    def failure_hints(self) -> dict[str, str] | None:
        """Advice by failure cause for a block with objectives: the step size is the usual culprit."""
        if not self.objectives:
            return None
        steps = ", ".join(
            f"{type(c).__name__}({c.variable.name}, step_size={c.step_size!r})" if c.auto_step
            else f"{type(c).__name__}({c.variable.name}, step_size={c.step_size:g})"
            for c in self.objectives
        )
        auto = any(c.auto_step for c in self.objectives)
        # "auto" is 1 / the curvature estimated at the start: a fixed number below it is the remedy when the
        # curvature grows along the way (or, in a block with equations, the estimate is off).
        lower = (f"pass step_size a number below 2 / the objective's largest curvature along the way to {steps} "
                 "(\"auto\" estimates it at the start only)" if auto else
                 f"lower the step size of {steps} (it must be below 2 / the objective's curvature)")
        return {
            "diverged": f"{lower}, or damp the equations",
            "nonfinite": f"{lower}, or check the objective for NaN at these points",
            "stalled": f"the objective may be unbounded below or flat; check it, or change the step size of {steps}",
            "max_iter": f"increase max_iter, or raise the step size of {steps} if the objective is flat (tiny curvature)",
        }

    def equation_indices(self, device: torch.device) -> torch.Tensor:
        """Indices of the equation variables in the packed unknown (for first-order IFT)."""
        return torch.cat([torch.arange(s.offset, s.offset + s.size, device=device) for s in self.equation_slots])

    def dual_warm_start(self, w_star: torch.Tensor, idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A warm start `g ↦ λ₀` of the IFT adjoint from the forward duals μ*, rescaled per sample to `g`.

        When the outer loss is the block's (single) total objective, the adjoint of the equations is
        exactly a multiple of μ* (JIIO's observation), so the backward solve starts at (or next to) its
        answer. Any block with one total objective gets it; `None` for other blocks.

        Args:
            w_star: the packed solution.
            idx: the equation rows of the packed unknown (`equation_indices`).
        """
        if len(self.total_objectives) != 1:
            return None
        obj = self.total_objectives[0]
        parts = [self.slots[self.adjoint_name(obj, eq)] for eq in self.equations]
        mu = torch.cat([w_star[:, s.offset : s.offset + s.size] for s in parts], 1).detach()

        def start(grad: torch.Tensor) -> torch.Tensor:
            # The adjoint system is over the equation rows (first-order IFT) or the whole block (exact IFT):
            # μ* fills the equation rows; the rest starts at zero.
            g_eq = grad if grad.shape[1] == idx.numel() else grad[:, idx]
            scale = (mu * g_eq).sum(1, keepdim=True) / (mu * mu).sum(1, keepdim=True).clamp_min(torch.finfo(mu.dtype).tiny)
            if grad.shape[1] == idx.numel():
                return scale * mu
            return torch.zeros_like(grad).index_copy(1, idx, scale * mu)

        return start

    def reads_grad(self, w: torch.Tensor, env: Mapping[str, torch.Tensor]) -> bool:
        """Whether any condition's value at `w` requires grad through something other than `w` itself
        (an outer tensor or a parameter the user's function captures). One plain evaluation of each function."""
        with torch.enable_grad():
            scope = {**env, **{n: v.detach() for n, v in self.unpack(w.detach()).items()}}
            return any(_requires_grad(self._call(c, scope)) for c in self.conditions)

    # ----------------------------------------------------------------------------- step sizes
    def step_sizes(self, w: torch.Tensor, env: Mapping[str, torch.Tensor]) -> StepSizes | None:
        """Per-sample steps `α = 1 / λ` of the block's `step_size="auto"` objectives, at the start `w`.

        `λ` is the largest absolute curvature of the signed objective in its variable, by power iteration
        from a fixed random direction (so a solve is reproducible), per sample:

        - an objective whose stationarity involves no adjoint (a block without equations, or a partial
          objective): `POWER_ITERATIONS` Hessian–vector products of the objective, by double backward,
          with the block's other variables held at `w`;
        - a total objective of a block with equations (its curvature is that of `L(v, z(v))`, through
          the equations): `KKT_POWER_ITERATIONS` evaluations of the block's residual along a direction
          whose equation and adjoint rows are relaxed, step by step, by the block's own damped map to the
          linear response of the equations (a finite-difference Jacobian–vector product each).

        The power iteration approaches `λ` from below, so `α` may exceed `1 / λ` somewhat; the fixed-point
        map `v ← Π(v − α ∇)` contracts for `α < 2 / λ`. `None` when the block has no `"auto"` objective.
        """
        auto = [c for c in self.objectives if isinstance(c, Minimize) and c.auto_step]
        if not auto:
            return None
        self._check_no_transform()
        w = w.detach()
        if w.shape[0] == 0:  # an empty batch: nothing to estimate (the power iteration's norms cannot reshape it)
            return StepSizes({c.variable.name: w.new_ones(0, 1) for c in auto}, {c.variable.name: w.new_zeros(0) for c in auto}, 0)
        values, curvature, products = {}, {}, 0
        for cond in auto:
            if cond in self.total_objectives:
                lam, spent = self._kkt_curvature(cond, w, env)
            else:
                lam, spent = self._objective_curvature(cond, w, env)
            usable = torch.isfinite(lam) & (lam > 0)
            alpha = torch.where(usable, 1.0 / torch.where(usable, lam, torch.ones_like(lam)), torch.ones_like(lam))
            name = cond.variable.name
            values[name], curvature[name] = alpha[:, None], lam
            products += spent
        return StepSizes(values, curvature, products)

    def _objective_curvature(self, cond: Minimize, w: torch.Tensor, env: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """`(λ (B,), products)`: power iteration on the Hessian of the signed objective in its variable."""
        name = cond.variable.name
        batch = w.shape[0]
        with torch.enable_grad():
            values = {n: t.detach() for n, t in self.unpack(w).items()}
            v = values[name] = values[name].clone().requires_grad_()
            loss = self.objective_value(cond, {**env, **values})
            if not loss.requires_grad:
                raise self._independent_objective(cond)
            (g,) = torch.autograd.grad(loss, [v], torch.full_like(loss, float(cond.sign)), create_graph=True, allow_unused=True)
            if g is None:
                raise self._independent_objective(cond)
            lam = w.new_zeros(batch)
            if not g.requires_grad:  # a linear objective: no curvature
                return lam, 0
            u = _unit(_probe(v))
            for k in range(POWER_ITERATIONS):
                (hu,) = torch.autograd.grad(g, [v], u, retain_graph=k < POWER_ITERATIONS - 1, allow_unused=True)
                if hu is None:
                    return lam, k + 1
                lam = _norms(hu)
                u = _unit(hu.detach(), lam)
        return lam.detach(), POWER_ITERATIONS

    def _kkt_curvature(self, cond: Minimize, w: torch.Tensor, env: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """`(λ (B,), residual evaluations)`: power iteration on the total objective's (reduced) Hessian.

        The direction `d` moves the variable by the unit `u` and the equation and adjoint rows by their
        linear response (`∂R_E/∂w · d = 0`), which each step relaxes by one damped step `d_E ← d_E − P_E ⊙
        (J d)_E`; `(J d)_v` is then the reduced Hessian times `u` (once the response has settled). `J d` is a
        forward difference of the residual (gradient rows, not the constrained natural residual).
        """
        slot = self.slots[cond.variable.name]
        objectives = {c.variable.name for c in self.objectives}
        relaxed = [s for s in self.slots.values() if s.name not in objectives]
        batch = w.shape[0]
        rows = torch.cat([torch.arange(s.offset, s.offset + s.size, device=w.device) for s in relaxed])
        damping = torch.cat([w.new_full((s.size,), s.damping) for s in relaxed])
        r0 = self.residual(w, env, gradients=True)
        d = torch.zeros_like(w)
        u = _probe(w[:, slot.offset : slot.offset + slot.size])
        d[:, slot.offset : slot.offset + slot.size] = _unit(u)
        # A forward-difference step well above the rounding of w, small enough to stay linear.
        scale = torch.finfo(w.dtype).eps ** 0.5 * (1.0 + _norms(w))
        lam = w.new_zeros(batch)
        for _ in range(KKT_POWER_ITERATIONS):
            h = (scale / _norms(d).clamp_min(torch.finfo(w.dtype).tiny))[:, None]
            jd = (self.residual(w + h * d, env, gradients=True) - r0) / h
            y = jd[:, slot.offset : slot.offset + slot.size]
            lam = _norms(y)
            d[:, rows] -= damping * jd[:, rows]
            d[:, slot.offset : slot.offset + slot.size] = _unit(y, lam)
        return lam, KKT_POWER_ITERATIONS + 1

    # ----------------------------------------------------------------------------- residual
    def residual(
        self,
        w: torch.Tensor,
        env: Mapping[str, torch.Tensor],
        *,
        create_graph: bool = False,
        equations_only: bool = False,
        steps: "StepSizes | None" = None,
        gradients: bool = False,
    ) -> torch.Tensor:
        """The packed residual `R(w)` `(B, D)` (or only its equation rows, `(B, D_E)`).

        Args:
            w: the packed unknown.
            env: the tensors of every node the block reads from outside (inputs, earlier blocks).
            create_graph: keep the graph of the inner vector–Jacobian products (for the IFT, Phantom and
                Unroll backward passes); otherwise the result is detached.
            equations_only: skip the objectives (first-order IFT treats optimised variables as constants).
            steps: the per-sample step sizes of `step_size="auto"` objectives (`step_sizes`), which a
                constrained objective's residual, the gradient mapping `(v − Π(v − α∇)) / α`, reads;
                without them such an objective's residual is taken at `α = 1` (`Minimize.fixed_step`). A
                solve and its backward pass must use the same.
            gradients: the (total) gradient in a constrained objective's rows instead of its natural
                residual (for curvature estimates).
        """
        needs_vjp = not equations_only and bool(self.objectives)
        if needs_vjp:
            self._check_no_transform()
        with torch.enable_grad() if (needs_vjp or create_graph) else _nullcontext():
            values = self.unpack(w)
            if needs_vjp and not w.requires_grad:
                # Fresh leaves per variable: cheaper than recording the slicing of a leaf `w` in the graph.
                values = {name: v.detach().requires_grad_() for name, v in values.items()}
            scope = {**env, **values}
            batch = w.shape[0]
            eq_residuals = {c.variable.name: self._equation_residual(c, scope) for c in self.equations}
            blocks = dict(eq_residuals)
            if not equations_only:
                blocks.update(self._objective_residuals(values, scope, eq_residuals, create_graph, steps, gradients))
            parts = [blocks[s.name].reshape(batch, s.size) for s in self.slots.values() if s.name in blocks]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return out if create_graph else out.detach()

    def _check_no_transform(self) -> None:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            raise NotImplementedError(
                f"{self.name}: torch.func transforms over a block with Minimize/Maximize (e.g. il.JIIO, il.IMAML) are "
                "not supported yet: its residual differentiates the objective with torch.autograd. Use torch.autograd "
                "(loss.backward(), torch.autograd.grad) for this layer; torch.func works over blocks of equations "
                "(il.DEQ, FixedPoint/Root problems)."
            )

    def _call(self, cond: Condition, scope: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`cond.fn(*args)`; an error raised inside the user's function is re-raised with the condition,
        the block and the shapes it received (the original exception chained)."""
        args = [scope[a.name] for a in cond.args]
        try:
            return cond.fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised with context, same type where possible
            if getattr(err, "_implicitlayers_context", False):
                raise  # an inner layer already said where it happened
            raise _with_context(err, self._describe_call(cond, args)) from err

    def _describe_call(self, cond: Condition, args: list[torch.Tensor]) -> str:
        received = ", ".join(f"{a.name}: {_shape_of(t)}" for a, t in zip(cond.args, args))
        own = self.slots[cond.variable.name].shape
        what = "function" if cond.is_equation else "objective"
        return (
            f"{type(cond).__name__}({cond.variable.name}) in {self.name}: the {what} raised while being called with "
            f"({received}); {cond.variable.name} has per-sample shape {own} (taken from its start: check the "
            f"init / z_init / input shapes you passed against what the {what} expects)"
        )

    def _independent_objective(self, cond: Condition) -> ValueError:
        v = cond.variable.name
        return ValueError(
            f"{type(cond).__name__}({v}) in {self.name}: the objective does not depend on {v} (autograd finds no "
            f"path from {v} to its value). Compute it from {v} with differentiable torch operations (no .detach(), "
            f".item(), numpy or in-place writes into {v}), and list {v} in its args."
        )

    def _equation_residual(self, cond: Condition, scope: Mapping[str, torch.Tensor]) -> torch.Tensor:
        name = cond.variable.name
        out = self._call(cond, scope)
        target = scope[name]
        if isinstance(out, torch.Tensor) and out.dtype != target.dtype and not torch.is_autocast_enabled(target.device.type):
            raise TypeError(
                f"{type(cond).__name__}({name}) in {self.name}: the function returned {out.dtype} but {name} is "
                f"{target.dtype} (its start's dtype, taken from the inputs); return {target.dtype} (cast inside the "
                "function, or give inputs and parameters one dtype)."
            )
        if not isinstance(out, torch.Tensor) or out.shape != target.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{type(cond).__name__}({name}) in {self.name}: the function returned {got} but {name} has shape "
                f"{tuple(target.shape)}; it must return a tensor shaped like {name}."
            )
        return target - out if isinstance(cond, FixedPoint) else out

    def objective_value(self, cond: Minimize, scope: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The objective as written, `(B,)` (its sign for a `Maximize` is applied by the caller)."""
        value = self._call(cond, scope)
        batch = scope[cond.variable.name].shape[0]
        if not isinstance(value, torch.Tensor) or value.shape != (batch,):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{type(cond).__name__}({cond.variable.name}) in {self.name}: the objective returned {got}; it must "
                f"return one value per sample, shape ({batch},). Reduce over the non-batch dimensions (e.g. .sum(1))."
            )
        return value

    def _objective_residuals(self, values, scope, eq_residuals, create_graph, steps, gradients) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        last = len(self.objectives) - 1
        for i, cond in enumerate(self.objectives):
            # Objectives share the equations' graph: keep it until the last one has been differentiated.
            retain = create_graph or i < last
            v_name = cond.variable.name
            v = values[v_name]
            loss = self.objective_value(cond, scope)
            if not loss.requires_grad:
                raise self._independent_objective(cond)
            if cond in self.total_objectives:
                duals = [values[self.adjoint_name(cond, eq)] for eq in self.equations]
                # ∇φ for φ = Σ_e ⟨μ_e, c_e⟩ − Σ L (L = sign · objective), as one VJP seeded with (μ, −sign):
                # building the scalar φ would add forward ops and their backward nodes to every evaluation.
                outputs = [eq_residuals[eq.variable.name] for eq in self.equations] + [loss]
                seeds = duals + [torch.full_like(loss, -float(cond.sign))]
                wrt = [values[eq.variable.name] for eq in self.equations] + [v]
                grads = torch.autograd.grad(
                    outputs, wrt, seeds, create_graph=create_graph, retain_graph=retain, allow_unused=True
                )
                grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
                for eq, g in zip(self.equations, grads[:-1]):
                    out[self.adjoint_name(cond, eq)] = g
                gradient = -grads[-1]
            else:
                (g,) = torch.autograd.grad(
                    loss, [v], torch.full_like(loss, float(cond.sign)), create_graph=create_graph, retain_graph=retain,
                    allow_unused=True,
                )
                if g is None:
                    raise self._independent_objective(cond)
                gradient = g
            if cond.constraint is not None and not gradients:
                # The gradient mapping (v − Π(v − α∇)) / α: ∇ itself wherever the set is inactive, so declaring a
                # constraint that never binds leaves the stopping test as it was (v − Π(v − α∇) alone would be
                # α∇ there, a test 1/α times looser: with α = 1/300 a minimiser 3x off passed as converged).
                alpha = steps.step_of(cond, v) if steps is not None else cond.fixed_step
                out[v_name] = cond.constraint.natural_residual(v, alpha * gradient) / alpha
            else:
                out[v_name] = gradient
        return out


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norms `(B,)` over every non-batch dimension."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _unit(t: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """`t` scaled to unit norm per sample (a zero sample stays zero)."""
    norms = _norms(t) if norms is None else norms
    tiny = torch.finfo(t.dtype).tiny
    return t / norms.clamp_min(tiny).reshape((t.shape[0],) + (1,) * (t.dim() - 1))


def _probe(like: torch.Tensor) -> torch.Tensor:
    """A fixed random direction shaped like `like`, the same for every sample and every call (a sample's
    step does not depend on the batch it is in, and solves are reproducible)."""
    gen = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(like.shape[1:], generator=gen, device=like.device, dtype=like.dtype).expand_as(like).clone()


def _requires_grad(t: torch.Tensor) -> bool:
    """`t.requires_grad`, looking through `torch.func.vmap`'s batched wrappers (which do not show it)."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.requires_grad


def _shape_of(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _with_context(err: Exception, context: str) -> Exception:
    """`err` again, with `context` in front of its message: the same type when it takes a message
    (so `except ValueError` in user code still works), else a `RuntimeError`."""
    message = f"{context}. The original error: {type(err).__name__}: {err}"
    try:
        new = type(err)(message)
    except Exception:  # noqa: BLE001 - an exception type with another signature
        new = RuntimeError(message)
    if str(new) != message:  # e.g. KeyError quotes its argument: keep the message readable
        new = RuntimeError(message)
    new._implicitlayers_context = True  # type: ignore[attr-defined]
    return new


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
