"""A block of a problem compiled into one packed residual `R(w)` (and map `F(w) = w − P ⊙ R(w)`).

The block's unknown `w` is a flat `(B, D)` tensor packing, in order, the block's variables and the
adjoint variables of its total objectives. For a total `Minimize(v, L)` with equations
`c_e(E, v) = 0` in the block (`c = z − f` for a fixed point, `c = g` for a root), the adjoints
`μ` (one per equation variable) and the stationarity conditions are the KKT system

    R_μ = (∂c/∂E)ᵀ μ − ∂L/∂E          (for c = z − f:  μ − J_zᵀ μ − ∂L/∂z)
    R_v = ∂L/∂v − (∂c/∂v)ᵀ μ          (for c = z − f:  ∂L/∂v + J_vᵀ μ)

both read off one vector–Jacobian product of `φ = Σ_e ⟨μ_e, c_e⟩ − L`: `R_μ = ∇_E φ`, `R_v = −∇_v φ`.
A constraint set replaces `R_v` by the natural residual `v − Π(v − α R_v)`, computed by the set without
cancellation (`ConstraintSet.natural_residual`): as a plain difference it rounds to 0 far out along an
unbounded direction and would report a point far from the solution as converged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch

from .problem import Condition, FixedPoint, Minimize, Problem

__all__ = ["Slot", "BlockSystem"]


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
                damping = 1.0 if cond.constraint is not None else cond.step_size
            else:
                damping = cond.damping
            add(name, tuple(shapes[name]), damping)
        for obj in self.total_objectives:
            for eq in self.equations:
                add(self.adjoint_name(obj, eq), tuple(shapes[eq.variable.name]), obj.adjoint_damping)
        self.slots = {s.name: s for s in slots}
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

    def preconditioner(self, like: torch.Tensor) -> torch.Tensor | None:
        """The `(D,)` diagonal `P` of the map `F(w) = w − P ⊙ R(w)`, or `None` when it is all ones."""
        if all(s.damping == 1.0 for s in self.slots.values()):
            return None
        return torch.cat([like.new_full((s.size,), s.damping) for s in self.slots.values()])

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
        steps = ", ".join(f"{type(c).__name__}({c.variable.name}, step_size={c.step_size:g})" for c in self.objectives)
        return {
            "diverged": f"lower the step size of {steps} (it must be below 2 / the objective's curvature), or damp the equations",
            "nonfinite": f"lower the step size of {steps}, or check the objective for NaN at these points",
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

    # ----------------------------------------------------------------------------- residual
    def residual(
        self,
        w: torch.Tensor,
        env: Mapping[str, torch.Tensor],
        *,
        create_graph: bool = False,
        equations_only: bool = False,
    ) -> torch.Tensor:
        """The packed residual `R(w)` `(B, D)` (or only its equation rows, `(B, D_E)`).

        Args:
            w: the packed unknown.
            env: the tensors of every node the block reads from outside (inputs, earlier blocks).
            create_graph: keep the graph of the inner vector–Jacobian products (for the IFT, Phantom and
                Unroll backward passes); otherwise the result is detached.
            equations_only: skip the objectives (first-order IFT treats optimised variables as constants).
        """
        needs_vjp = not equations_only and bool(self.objectives)
        if needs_vjp and torch._C._functorch.peek_interpreter_stack() is not None:
            raise NotImplementedError(
                f"{self.name}: torch.func transforms over a block with Minimize/Maximize (e.g. il.JIIO, il.IMAML) are "
                "not supported yet: its residual differentiates the objective with torch.autograd. Use torch.autograd "
                "(loss.backward(), torch.autograd.grad) for this layer; torch.func works over blocks of equations "
                "(il.DEQ, FixedPoint/Root problems)."
            )
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
                blocks.update(self._objective_residuals(values, scope, eq_residuals, create_graph))
            parts = [blocks[s.name].reshape(batch, s.size) for s in self.slots.values() if s.name in blocks]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return out if create_graph else out.detach()

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

    def _objective_residuals(self, values, scope, eq_residuals, create_graph) -> dict[str, torch.Tensor]:
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
            if cond.constraint is not None:
                out[v_name] = cond.constraint.natural_residual(v, cond.step_size * gradient)
            else:
                out[v_name] = gradient
        return out


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
