"""`ImplicitLayer`: a `Problem` wrapped as an `nn.Module` (inputs in, solved variables out)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .nn._cache import cached_weights
from .backward import IFT, AdjointProblem, Phantom, Unroll, adjoint_solver, attach_ift
from .problem import Input, Problem, Variable
from .solvers import Anderson, SolveInfo
from .system import BlockSystem

__all__ = ["ImplicitLayer", "Solution"]


@dataclasses.dataclass(frozen=True)
class Solution:
    """Everything a solve produced.

    Attributes:
        values: every variable's `(B, ...)` solution, by name (differentiable per the backward mode).
        info: the forward `SolveInfo` of each block, by block name (e.g. `"block 0 (z, u)"`).
        duals: the adjoint variables of total objectives (e.g. `"mu[u|z]"`), detached.
    """

    values: dict[str, torch.Tensor]
    info: dict[str, SolveInfo]
    duals: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]


class ImplicitLayer(nn.Module):
    """A differentiable layer whose outputs are the solutions of an implicit problem.

    Args:
        problem: the `il.Problem`.
        inputs: the `il.Input` nodes, in the order the layer is called with.
        outputs: the `il.Variable` nodes returned, in order.
        solver: forward solver for every block (default `il.Anderson()`).
        backward: `il.IFT()` (default), `il.Phantom(...)` or `il.Unroll()`.
        init: start of each variable, by name: a callable receiving the layer's input tensors (in the
            order of `inputs`) and returning the `(B, ...)` start, or a tensor, batched or one sample's
            shape (broadcast over the batch). Every variable needs one.

    Functions (or `nn.Module`s) used in the conditions that are modules are registered as
    submodules, so their parameters appear in `layer.parameters()`. Parameters captured in closures
    receive gradients too (the IFT differentiates the residual with autograd).
    """

    def __init__(
        self,
        problem: Problem,
        inputs: Sequence[Input],
        outputs: Sequence[Variable],
        *,
        solver: Any = None,
        backward: IFT | Phantom | Unroll | None = None,
        init: Mapping[str, torch.Tensor | Callable[..., torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(problem, Problem):
            raise TypeError(f"ImplicitLayer: problem must be an il.Problem, got {type(problem).__name__}.")
        inputs, outputs = list(inputs), list(outputs)
        for node in inputs:
            if not isinstance(node, Input):
                raise TypeError(f"ImplicitLayer: inputs must be il.Input nodes, got {node!r}.")
        if not inputs:
            raise ValueError("ImplicitLayer: give at least one input; the inputs set the batch size, dtype and device.")
        missing = sorted(set(problem.inputs) - {i.name for i in inputs})
        if missing:
            raise ValueError(f"ImplicitLayer: the problem reads input(s) {missing} that are not in inputs=; list them.")
        unknown = [i.name for i in inputs if i.name not in problem.inputs]
        if unknown:
            raise ValueError(f"ImplicitLayer: input(s) {unknown} are not read by any condition of the problem.")
        if len({i.name for i in inputs}) != len(inputs):
            raise ValueError("ImplicitLayer: an input is listed twice in inputs=.")
        if not outputs:
            raise ValueError("ImplicitLayer: outputs= must name at least one variable.")
        for node in outputs:
            if not isinstance(node, Variable) or node.name not in problem.variables:
                raise ValueError(f"ImplicitLayer: output {node!r} is not a variable of the problem; variables are {sorted(problem.variables)}.")
        init = dict(init or {})
        absent = sorted(set(problem.variables) - set(init))
        if absent:
            raise ValueError(
                f"ImplicitLayer: no init for variable(s) {absent}; pass init={{name: tensor or callable of the inputs}}."
            )
        extra = sorted(set(init) - set(problem.variables))
        if extra:
            raise ValueError(f"ImplicitLayer: init names unknown variable(s) {extra}; variables are {sorted(problem.variables)}.")
        if backward is not None and not isinstance(backward, (IFT, Phantom, Unroll)):
            raise TypeError(f"ImplicitLayer: backward must be il.IFT(), il.Phantom() or il.Unroll(), got {backward!r}.")
        if solver is not None and not hasattr(solver, "solve"):
            raise TypeError(f"ImplicitLayer: solver must be an implicitlayers solver (e.g. il.Anderson()), got {solver!r}.")
        self.problem = problem
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in outputs]
        self.solver = solver if solver is not None else Anderson()
        self.backward_mode = backward if backward is not None else IFT()
        self.init = init
        self.functions = nn.ModuleList(
            dict.fromkeys(c.fn for c in problem.conditions.values() if isinstance(c.fn, nn.Module))
        )
        self._systems: dict[tuple, BlockSystem] = {}
        self._sample_shapes: dict[str, tuple[int, ...]] = {}
        self.last_solution: Solution | None = None
        self._adjoints: dict[str, AdjointProblem] = {}

    @property
    def backward_info(self) -> dict[str, SolveInfo | None]:
        """The `SolveInfo` of each block's last IFT backward solve (`None` until a backward pass ran)."""
        return {name: adjoint.info for name, adjoint in self._adjoints.items()}

    # ------------------------------------------------------------------------------ calling
    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Solve for the given inputs; returns the outputs' solutions as a tuple in the order of `outputs`."""
        solution = self.solve(*tensors)
        return tuple(solution.values[n] for n in self.output_names)

    # A user's `torch.compile(model)` breaks the graph cleanly here instead of tracing the solver loop
    # (whose data-dependent stopping makes Dynamo skip frames and compile tiny per-iteration lambdas).
    @torch.compiler.disable
    def solve(self, *tensors: torch.Tensor) -> Solution:
        """Solve for the given inputs; returns the full `Solution` (every variable, per-block info).

        Normalised weights (`il.nn.weight_norm`, `il.nn.spectral_norm`) are computed once for the whole
        solve, not once per iteration. Under `torch.compile` the solve runs eagerly (a graph break).
        """
        with cached_weights():
            return self._solve(*tensors)

    def _solve(self, *tensors: torch.Tensor) -> Solution:
        env = self._check_inputs(tensors)
        batch = tensors[0].shape[0]
        ref = next(t for t in tensors if t.is_floating_point())  # starts take its dtype and device
        starts = {name: self._start(name, tensors, batch, ref) for name in self.problem.variables}
        infos: dict[str, SolveInfo] = {}
        duals: dict[str, torch.Tensor] = {}
        for index in range(len(self.problem.blocks)):
            system = self._system(index, starts)
            values, info, block_duals = self._solve_block(system, env, starts, batch)
            env.update(values)
            infos[system.name] = info
            duals.update(block_duals)
        solution = Solution(values={n: env[n] for n in self.problem.variables}, info=infos, duals=duals)
        # Detached, so that keeping the last solution does not keep the last call's autograd graph alive.
        self.last_solution = Solution({n: v.detach() for n, v in solution.values.items()}, infos, duals)
        return solution

    # ------------------------------------------------------------------------------ one block
    def _solve_block(self, system: BlockSystem, env: dict, starts: dict, batch: int):
        outer = {n: env[n] for n in system.reads}
        w0 = system.pack({n: starts[n] for n in system.names}, batch)
        precond = system.preconditioner(w0)
        track = torch.is_grad_enabled()
        mode = self.backward_mode
        if isinstance(mode, Unroll) and track:
            w_out, info = self.solver.solve(
                lambda w: system.residual(w, outer, create_graph=True), w0, precond=precond, name=system.name
            )
            w_out = system.project_constrained(w_out)
        else:
            detached = {n: t.detach() for n, t in outer.items()}
            with torch.no_grad():
                w_star, info = self.solver.solve(
                    lambda w: system.residual(w, detached), w0.detach(), precond=precond, name=system.name
                )
                w_star = system.project_constrained(w_star)
            w_out = self._differentiate(system, w_star, outer, detached, precond) if track else w_star
        values = system.unpack(w_out)
        duals = {n: values.pop(n).detach() for n in list(values) if n not in system.names}
        return values, info, duals

    def _differentiate(self, system, w_star, outer, detached, precond) -> torch.Tensor:
        mode = self.backward_mode
        if isinstance(mode, Phantom):
            w = w_star
            for _ in range(mode.k):
                r = system.residual(w, outer, create_graph=True)
                step = r if precond is None else r * precond
                w = w - mode.damping * step
            return w
        if not isinstance(mode, IFT):  # Unroll under no_grad never reaches here
            return w_star
        solver = adjoint_solver(mode, self.solver)
        if mode.first_order and system.objectives:
            if not system.equations:
                return w_star  # optimised variables only: constants by definition of first_order
            idx = system.equation_indices(w_star.device)
            sub_precond = None if precond is None else precond[idx]

            def embed(w_eq: torch.Tensor) -> torch.Tensor:
                return w_star.detach().index_copy(1, idx, w_eq)

            adjoint = AdjointProblem(
                residual=lambda w_eq: system.residual(embed(w_eq), detached, create_graph=True, equations_only=True),
                w_star=w_star[:, idx], solver=solver, precond=sub_precond, name=system.name,
                warm_start=self._dual_warm_start(system, w_star, idx), second_order=mode.second_order,
            )
            self._adjoints[system.name] = adjoint
            out_eq = attach_ift(
                lambda w_eq: system.residual(embed(w_eq), outer, create_graph=True, equations_only=True), w_star[:, idx], adjoint
            )
            return w_star.detach().index_copy(1, idx, out_eq)
        adjoint = AdjointProblem(
            residual=lambda w: system.residual(w, detached, create_graph=True),
            w_star=w_star, solver=solver, precond=precond, name=system.name, second_order=mode.second_order,
            warm_start=self._dual_warm_start(system, w_star, system.equation_indices(w_star.device)) if system.equations else None,
        )
        self._adjoints[system.name] = adjoint
        return attach_ift(lambda w: system.residual(w, outer, create_graph=True), w_star, adjoint)

    @staticmethod
    def _dual_warm_start(system: BlockSystem, w_star: torch.Tensor, idx: torch.Tensor):
        """Warm start of the adjoint from the forward dual μ*, rescaled per sample to the gradient.

        When the outer loss is the inner objective, the DEQ adjoint of the equations is exactly a multiple
        of μ* (JIIO's observation), so the backward solve starts at (or next to) its answer.
        """
        if len(system.total_objectives) != 1:
            return None
        obj = system.total_objectives[0]
        parts = [system.slots[system.adjoint_name(obj, eq)] for eq in system.equations]
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

    # ------------------------------------------------------------------------------ checks
    def _system(self, index: int, starts: Mapping[str, torch.Tensor]) -> BlockSystem:
        shapes = {n: tuple(starts[n].shape[1:]) for n in self.problem.blocks[index]}
        key = (index, tuple(sorted(shapes.items())))
        if key not in self._systems:
            self._systems[key] = BlockSystem(self.problem, index, shapes)
        return self._systems[key]

    def _check_inputs(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(tensors) != len(self.input_names):
            raise TypeError(
                f"ImplicitLayer: expected {len(self.input_names)} input tensor(s) ({', '.join(self.input_names)}), got {len(tensors)}."
            )
        env: dict[str, torch.Tensor] = {}
        first = None
        for name, t in zip(self.input_names, tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"ImplicitLayer: input {name!r} must be a torch.Tensor, got {type(t).__name__}.")
            if t.dim() == 0:
                raise ValueError(f"ImplicitLayer: input {name!r} must have a leading batch dimension, got a scalar.")
            if first is None:
                first = (name, t)
            else:
                fname, ft = first
                if t.shape[0] != ft.shape[0]:
                    raise ValueError(
                        f"ImplicitLayer: inputs disagree on the batch size: {fname!r} has {ft.shape[0]}, {name!r} has {t.shape[0]}."
                    )
                if t.device != ft.device:
                    raise ValueError(f"ImplicitLayer: input {name!r} is on {t.device} but {fname!r} is on {ft.device}; move them to one device.")
                if t.is_floating_point() and ft.is_floating_point() and t.dtype != ft.dtype:
                    raise TypeError(f"ImplicitLayer: input {name!r} is {t.dtype} but {fname!r} is {ft.dtype}; use one floating dtype.")
            if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(f"ImplicitLayer: input {name!r} contains NaN or Inf values.")
            env[name] = t
        if tensors and not any(t.is_floating_point() for t in tensors):
            raise TypeError("ImplicitLayer: at least one input must be a floating-point tensor (it sets the dtype of the solve).")
        return env

    def _start(self, name: str, tensors: Sequence[torch.Tensor], batch: int, ref: torch.Tensor) -> torch.Tensor:
        """The `(B, ...)` start of a variable from its `init` entry.

        A callable's result and a tensor whose first dimension is B (with at least two dimensions) are
        batched starts; any other tensor is one sample's start, broadcast over the batch. Once a
        variable's sample shape is known (after the first call), a tensor equal to that sample shape is
        always broadcast, and a start of any other shape is an error. For a matrix-shaped variable whose
        first dimension may equal the batch size, pass a callable.
        """
        spec = self.init[name]
        from_callable = callable(spec) and not isinstance(spec, torch.Tensor)
        value = spec(*tensors) if from_callable else spec
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"ImplicitLayer: init for {name!r} must be a tensor or return one, got {type(value).__name__}.")
        value = value.detach().to(device=ref.device, dtype=ref.dtype)
        known = self._sample_shapes.get(name)
        if known is not None:
            batched = tuple(value.shape) == (batch, *known)
            if not batched and tuple(value.shape) != known:
                raise ValueError(
                    f"ImplicitLayer: init for {name!r} has shape {tuple(value.shape)}, which is neither one sample {known} "
                    f"nor a batch {(batch, *known)}."
                )
        else:
            batched = value.dim() >= 1 and value.shape[0] == batch and (from_callable or value.dim() > 1)
            self._sample_shapes[name] = tuple(value.shape[1:]) if batched else tuple(value.shape)
        return value if batched else value.expand(batch, *value.shape).contiguous()
