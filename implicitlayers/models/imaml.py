"""`IMAML`: implicit model-agnostic meta-learning (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019).

Each task `t` of a meta-batch adapts the meta-parameters `θ` (the parameters of `model`) to

    φ*_t = argmin_φ  L_train,t(φ) + λ/2 ‖φ − θ‖²,

and the meta-gradient of a query loss is `(I + H_t/λ)⁻¹ ∇L_test,t(φ*_t)`, with `H_t` the Hessian of
`L_train,t` at `φ*_t`. Nothing here is specific to meta-learning: the adaptation is one `Minimize`
node whose objective reads `θ` as an `Input`, the task dimension `T` is the batch dimension, and the
unknown is each task's flat packed `φ`, shape `(T, P)`. The layer's IFT of the stationarity residual

    R(φ, θ) = ∇_φ L_train(φ) + λ (φ − θ)

gives `A = ∂R/∂φ = H + λI` and `∂R/∂θ = −λI`, so `dφ*/dθ = λ (H + λI)⁻¹ = (I + H/λ)⁻¹`, exactly the
iMAML Jacobian. `A` is symmetric (a Hessian plus `λI`) and positive definite once `H ≻ −λI`, so the
adjoint system is solved by conjugate gradient with Hessian–vector products (double backward through
the residual), and memory does not depend on how many inner iterations the forward solve took.

All `T` tasks are solved at once: the per-task loss is `torch.func.functional_call` of the model with
that task's parameters, vectorised over tasks with `torch.func.vmap`.

**Step size from curvature.** The forward solve iterates `φ ← φ − α R(φ)` (accelerated by Anderson).
`A = H + λI` has its spectrum in `[λ, L + λ]` (for `H ⪰ 0`), with `L` the largest curvature of
`L_train`, and `L` grows during meta-training (on the few-shot digits example from about 1 at the
initialisation to about 240 after 500 meta-steps, with λ = 1), so no fixed α suits a whole run. With
`step_size="auto"` (the default) every call estimates `L_t = ‖H_t‖₂` of each task at θ by a few power
iterations of Hessian–vector products, warm-started from the previous call's vectors, and sets one α
for the meta-batch from `L = max_t L_t`: `α = 1/(L + λ)` for plain gradient steps
(`il.FixedPointIteration`, the descent step of an `(L + λ)`-smooth objective) and
`α = 1/√(λ (L + λ))` for the accelerated solvers (`il.Anderson`, `il.Broyden`), which centres the
spectrum of `αA` around 1 on a log scale (measured: about 2.5× fewer Anderson iterations than
`1/(L + λ)` late in meta-training, where plain steps of that size diverge).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..backward import IFT, Phantom, Unroll
from ..layer import ImplicitLayer, Solution
from ..problem import Input, Minimize, Problem, Variable
from ..solvers import Anderson, Broyden, FixedPointIteration, SolveInfo, Solver, SolverConfig, apply_failure_policy

__all__ = ["IMAML", "default_backward"]

InnerLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepSize = float | Literal["auto"]


def default_backward(tol: float = 1e-6, max_iter: int = 100) -> IFT:
    """The default meta-gradient: `il.IFT` with conjugate gradient (`il.linear.CG`) on `(H + λI) λ = g`.

    Falls back to Anderson on the linear fixed-point map when `implicitlayers.linear` is unavailable.
    """
    try:
        from ..linear import CG
    except ImportError:  # pragma: no cover - only while the linear solvers are not installed
        return IFT(solver=Anderson(memory=5, tol=tol, max_iter=max_iter))
    return IFT(solver=CG(tol=tol, max_iter=max_iter))


class IMAML(nn.Module):
    """Implicit MAML: `imaml(support_x, support_y)` returns each task's adapted parameters.

    For a meta-batch of `T` tasks, the call solves, in one batched solve,
    `φ*_t = argmin_φ L_train,t(φ) + λ/2 ‖φ − θ‖²` where `θ` are `model`'s parameters and
    `L_train,t(φ) = inner_loss(model_φ(support_x[t]), support_y[t])`. The result is differentiable
    with respect to `θ` by the implicit meta-gradient `(I + H/λ)⁻¹ ∇L_test` (module docstring).

    Args:
        model: the network; its trainable parameters are the meta-parameters `θ`. Buffers are shared
            by all tasks and not adapted.
        inner_loss: `(prediction, target) -> scalar` for **one** task (e.g. `F.cross_entropy`, a mean
            over the support set). It is vectorised over tasks with `torch.func.vmap`, so it must be a
            pure tensor function (no `.item()`, no data-dependent Python branching).
        lam: the proximal strength λ > 0 (the paper uses λ = 2). Larger λ keeps `φ*` closer to `θ`.
        solver: forward solver of the inner problem (default
            `il.Anderson(memory=10, tol=1e-5, max_iter=500)` on the gradient-step map `φ ← φ − α R(φ)`):
            a tolerance-driven budget, each task stops when it meets `tol` (the norm of its gradient
            `R`). With `step_size="auto"`, a task that Anderson or Broyden leaves short of `tol` (they
            can stall where `L_train` is not convex) is solved on from its best iterate by plain
            gradient steps of the descent size `1/(L + λ)`, for up to `4 × max_iter` more steps; one
            that still misses it warns (`il.ConvergenceWarning`) under the default `on_failure="warn"`.
            `il.Broyden` works on `R` directly (α scales its initial inverse Jacobian).
        backward: `il.IFT(solver=il.linear.CG(...))` by default (`default_backward()`); `il.Phantom`
            and `il.Unroll` also apply. A task whose CG solve does not meet its tolerance gets a zero
            meta-gradient (and a warning, by the IFT's failure policy): give CG enough iterations.
        step_size: the gradient step α of the fixed-point map. `"auto"` (default) sets it on every call
            from the curvature of the tasks (module docstring): `1/(L + λ)` for `il.FixedPointIteration`
            and any solver other than Anderson and Broyden, `1/√(λ (L + λ))` for `il.Anderson` and
            `il.Broyden`. A positive float fixes it (plain gradient steps need α < 2/(L + λ)).
        power_iters: Hessian–vector products per call for the curvature estimate of `step_size="auto"`
            (power iterations, warm-started from the previous call's vectors, so an estimate within
            about 10 % after the first call); ignored for a float `step_size`.

    Cost of `step_size="auto"`: one gradient of the meta-batch's training loss with its graph kept,
    then `power_iters` batched Hessian–vector products (double backward), about
    `2 + 2·power_iters` gradient evaluations per call; a converged inner solve on the few-shot
    digits example takes 15–45 evaluations.

    !!! warning
        Use a smooth model (tanh, softplus, GELU). With ReLU the proximal minimiser can sit on a kink,
        where no gradient vanishes: the inner residual stalls and the implicit derivative is undefined.

    Attributes:
        last_solution: the `il.Solution` of the last call.
        last_step_size: the α used by the last call.
        last_curvature: `(T,)` the curvature estimates `‖H_t‖₂` at θ of the last call (`None` for a
            float `step_size`).
        last_finished_by_descent: how many tasks of the last call the solver left short of `tol`, so
            that plain gradient steps finished them (`step_size="auto"`; `last_info` has the end result).

    Example:
        ```python
        import torch, torch.nn.functional as F
        import implicitlayers as il

        model = torch.nn.Linear(64, 5)
        imaml = il.IMAML(model, F.cross_entropy, lam=2.0)
        sx, sy = torch.rand(16, 5, 64), torch.randint(0, 5, (16, 5))    # 16 tasks, 5 shots each
        qx, qy = torch.rand(16, 15, 64), torch.randint(0, 5, (16, 15))
        params = imaml(sx, sy)                      # {"weight": (16, 5, 64), "bias": (16, 5)}
        logits = imaml.functional(params, qx)       # (16, 15, 5)
        F.cross_entropy(logits.flatten(0, 1), qy.flatten()).backward()   # meta-gradient in model.*.grad
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        inner_loss: InnerLoss,
        lam: float,
        *,
        solver: Any = None,
        backward: IFT | Phantom | Unroll | None = None,
        step_size: StepSize = "auto",
        power_iters: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"IMAML: model must be an nn.Module (its parameters are θ), got {type(model).__name__}.")
        if not callable(inner_loss):
            raise TypeError(f"IMAML: inner_loss must be a callable (prediction, target) -> scalar, got {type(inner_loss).__name__}.")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"IMAML: lam must be a positive finite number, got {lam!r}.")
        auto = _check_step_size(step_size)
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"IMAML: power_iters must be a positive int (Hessian–vector products per call), got {power_iters!r}.")
        if auto and isinstance(backward, Phantom):
            raise ValueError(
                "IMAML: step_size='auto' sets the inner step on every call, but il.Phantom unrolls the map with the "
                "problem's fixed step; pass a float step_size (below 2/(L + λ)) with il.Phantom."
            )
        self.model = model
        self.inner_loss = inner_loss
        self.lam = float(lam)
        self.step_size: StepSize = step_size if auto else float(step_size)
        self.power_iters = power_iters
        trainable = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("IMAML: the model has no trainable parameters to adapt.")
        # Fixed at construction (evaluated inside every residual evaluation, so kept cheap).
        self._names = [n for n, _ in trainable]
        self._shapes = [tuple(s) for _, s in trainable]
        self._sizes = [math.prod(s) for s in self._shapes]
        # With "auto" the problem's own step is what a fixed-point adjoint solver of the backward uses (the
        # default CG does not depend on it: a scalar preconditioner leaves its iterates unchanged).
        fixed = 1.0 / (self.lam + 1.0) if auto else float(step_size)
        theta, sx, sy, phi = Input("theta"), Input("support_x"), Input("support_y"), Variable("phi")
        problem = Problem([Minimize(phi, self._objective, (phi, theta, sx, sy), step_size=fixed)])
        inner = solver if solver is not None else Anderson(memory=10, tol=1e-5, max_iter=500)
        self.layer = ImplicitLayer(
            problem,
            inputs=[theta, sx, sy],
            outputs=[phi],
            solver=_AutoStep.around(inner) if auto else inner,
            backward=backward if backward is not None else default_backward(),
            init={"phi": _start_at_theta},
        )
        # The objective is a bound method of this module, so the layer registered no module of its
        # own: `imaml.parameters()` lists exactly the model's parameters.
        self.last_step_size: float = fixed
        self.last_curvature: torch.Tensor | None = None
        self._power_vectors: torch.Tensor | None = None

    @property
    def solver(self) -> Any:
        """The forward solver of the inner problem (without the per-call step of `step_size="auto"`)."""
        solver = self.layer.solver
        return solver.inner if isinstance(solver, _AutoStep) else solver

    @solver.setter
    def solver(self, solver: Any) -> None:
        if not isinstance(solver, Solver):
            raise TypeError(f"IMAML: solver must be an implicitlayers solver (e.g. il.Anderson()), got {solver!r}.")
        current = self.layer.solver
        self.layer.solver = current.replace(inner=solver) if isinstance(current, _AutoStep) else solver

    # ------------------------------------------------------------------------------ the problem
    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split packed parameters `(..., P)` into a dict name → `(..., *param.shape)`."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self._sizes, dim=-1)
        return {n: p.reshape(*lead, *s) for n, s, p in zip(self._names, self._shapes, parts)}

    def flat_parameters(self) -> torch.Tensor:
        """θ packed into one `(P,)` vector (differentiable: gradients reach the model's parameters)."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].reshape(-1) for n in self._names])

    def task_loss(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`L_train` of one task: the inner loss of the model with packed parameters `phi` `(P,)`."""
        out = functional_call(self.model, self.unflatten(phi), (x,))
        return self.inner_loss(out, y)

    def _objective(self, phi: torch.Tensor, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = vmap(self.task_loss)(phi, x, y)
        if losses.shape != phi.shape[:1]:
            raise ValueError(
                f"IMAML: inner_loss must return a scalar per task, got shape {tuple(losses.shape[1:])}; reduce it "
                "over the support set (e.g. a mean)."
            )
        return losses + 0.5 * self.lam * (phi - theta).pow(2).sum(1)

    # ------------------------------------------------------------------------------ the step size
    def curvature(self, support_x: torch.Tensor, support_y: torch.Tensor, iters: int | None = None) -> torch.Tensor:
        """Per task, an estimate of `‖H_t‖₂`, the largest curvature of `L_train,t` at θ: `(T,)`.

        Power iteration on `v ↦ H_t v` (Hessian–vector products by double backward, all tasks batched),
        `iters` products (default `power_iters`), started from the previous call's vectors (θ moves
        little between meta-steps, and the leading curvature directions of tasks are alike, so any
        previous task's vector serves, also for another number of tasks), on the first call from a
        fixed random draw. It approaches `‖H_t‖₂`
        from below. Not differentiable (the data and θ are detached).
        """
        iters = self.power_iters if iters is None else iters
        sx, sy = support_x.detach(), support_y.detach()
        theta = self.flat_parameters().detach().to(sx.dtype)
        phi = theta.expand(sx.shape[0], theta.shape[0]).clone().requires_grad_()
        v = self._power_vectors
        if v is None or v.shape[1:] != phi.shape[1:] or v.dtype != phi.dtype or v.device != phi.device:
            gen = torch.Generator(device=phi.device).manual_seed(0)  # reproducible, and the global RNG is untouched
            v = torch.randn(phi.shape, generator=gen, dtype=phi.dtype, device=phi.device)
        elif v.shape[0] != phi.shape[0]:  # another number of tasks: reuse the vectors cyclically (any task's will do)
            v = v[torch.arange(phi.shape[0], device=v.device) % v.shape[0]]
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        norm = phi.new_zeros(phi.shape[0])
        with torch.enable_grad():
            (g,) = torch.autograd.grad(vmap(self.task_loss)(phi, sx, sy).sum(), phi, create_graph=True)
            for _ in range(iters):
                hv = None
                if g.requires_grad:  # else L_train is linear in φ: no curvature
                    (hv,) = torch.autograd.grad(g, phi, v, retain_graph=True, allow_unused=True)
                if hv is None:
                    norm = phi.new_zeros(phi.shape[0])
                    break
                norm = torch.linalg.vector_norm(hv, dim=1)
                # A task with H_t v = 0 keeps its vector (its estimate is 0).
                v = torch.where(norm[:, None] > 0, hv / norm.clamp_min(torch.finfo(hv.dtype).tiny)[:, None], v)
        self._power_vectors = v.detach()
        return norm.detach()

    def auto_step_size(self, curvature: float) -> float:
        """The step `step_size="auto"` takes for the largest curvature `L` of a meta-batch (module docstring)."""
        if isinstance(self.solver, (Anderson, Broyden)):
            return 1.0 / math.sqrt(self.lam * (curvature + self.lam))
        return 1.0 / (curvature + self.lam)

    # ------------------------------------------------------------------------------ calling
    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adapt to a meta-batch: `support_x` `(T, N, ...)`, `support_y` `(T, N, ...)`.

        Returns:
            Each adapted parameter by name, shape `(T, *param.shape)`, differentiable with respect to
            the model's parameters (and the support data) by the backward mode.
        """
        self._check_support(support_x, support_y)
        if torch.is_inference_mode_enabled():
            # The inner problem's residual and its curvature estimate are gradients, which autograd cannot take
            # in inference mode (nor through inference tensors): adapt as under no_grad, on ordinary copies.
            with torch.inference_mode(False), torch.no_grad():
                return self(*(t.clone() if t.is_inference() else t for t in (support_x, support_y)))
        solver = self.layer.solver
        if isinstance(solver, _AutoStep):
            try:
                curvature = self.curvature(support_x, support_y)
            except RuntimeError as error:
                raise self._support_error(support_x, support_y, error) from error
            largest = float(curvature.max())
            if not math.isfinite(largest):
                raise ValueError(
                    f"IMAML: the curvature estimate of L_train at θ is not finite ({largest}); check inner_loss and the "
                    "support data, or pass a float step_size."
                )
            self.last_curvature = curvature
            self.last_step_size = self.auto_step_size(largest)
            self.layer.solver = solver.replace(step=self.last_step_size, descent=1.0 / (largest + self.lam))
        theta = self.flat_parameters().to(support_x.dtype)
        batch_theta = theta.expand(support_x.shape[0], theta.shape[0])
        try:
            (phi,) = self.layer(batch_theta, support_x, support_y)
        except RuntimeError as error:
            raise self._support_error(support_x, support_y, error) from error
        return self.unflatten(phi)

    @staticmethod
    def _support_error(support_x: torch.Tensor, support_y: torch.Tensor, error: RuntimeError) -> Exception:
        """A shape error inside the vmapped loss, re-raised naming the support shapes (others unchanged)."""
        if "vmap" in str(error) or "shape" in str(error) or "size" in str(error):
            return ValueError(
                f"IMAML: evaluating inner_loss(model(support_x[t]), support_y[t]) failed for one task's support_x of "
                f"shape {tuple(support_x.shape[1:])} and support_y of shape {tuple(support_y.shape[1:])}: {error}"
            )
        return error

    def functional(self, params: dict[str, torch.Tensor], query_x: torch.Tensor) -> torch.Tensor:
        """The model on each task's queries with that task's parameters: `(T, M, ...) -> (T, M, ...)`.

        Args:
            params: the output of `imaml(...)` (name → `(T, *param.shape)`).
            query_x: `(T, M, ...)` inputs, one group per task.
        """
        if not isinstance(params, dict) or set(params) != set(self._names):
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"IMAML.functional: params must be the dict returned by imaml(...) with keys {self._names}, got {got}.")
        if not isinstance(query_x, torch.Tensor) or query_x.dim() < 2:
            raise ValueError(
                f"IMAML.functional: query_x must be a (T, M, ...) tensor, got {getattr(query_x, 'shape', type(query_x).__name__)}."
            )
        tasks = sorted({p.shape[0] for p in params.values()})
        if tasks != [query_x.shape[0]]:
            held = tasks[0] if len(tasks) == 1 else tasks
            raise ValueError(f"IMAML.functional: params hold {held} task(s) but query_x has {query_x.shape[0]}; they must match.")
        return vmap(lambda p, x: functional_call(self.model, p, (x,)))(params, query_x)

    def _check_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        for name, t in (("support_x", support_x), ("support_y", support_y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"IMAML: {name} must be a torch.Tensor, got {type(t).__name__}.")
            if t.dim() < 2:
                raise ValueError(
                    f"IMAML: {name} must have shape (T, N, ...) — tasks, then support examples — got {tuple(t.shape)}."
                )
        if not support_x.is_floating_point():
            raise TypeError(f"IMAML: support_x must be floating point, got {support_x.dtype}.")
        if support_x.shape[0] == 0:
            raise ValueError(f"IMAML: support_x has no tasks (shape {tuple(support_x.shape)}); a meta-batch needs at least one task T.")
        if support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                f"IMAML: support_x has {support_x.shape[0]} task(s) but support_y has {support_y.shape[0]}; "
                "both need the same leading task dimension T."
            )
        if support_x.shape[1] != support_y.shape[1]:
            missing = support_y.dim() == 1 or (support_y.dim() == 2 and support_x.dim() == 2)
            hint = (" — is the task dimension missing? One task's (N, ...) data is (1, N, ...) (add .unsqueeze(0))"
                    if missing else "")
            raise ValueError(
                f"IMAML: support_x has {support_x.shape[1]} example(s) per task but support_y has {support_y.shape[1]}; "
                f"the second dimension N (support examples) must match{hint}."
            )

    # ------------------------------------------------------------------------------ diagnostics
    @property
    def last_solution(self) -> Solution | None:
        """The `il.Solution` of the last call (`values["phi"]` is the packed `(T, P)` solution)."""
        return self.layer.last_solution

    @property
    def last_finished_by_descent(self) -> int:
        """Tasks of the last call that the solver left short of `tol`, finished by plain gradient steps (0 without "auto")."""
        solver = self.layer.solver
        return solver.record.get("finished_by_descent", 0) if isinstance(solver, _AutoStep) else 0

    @property
    def last_info(self) -> SolveInfo | None:
        """The forward `SolveInfo` of the last inner solve (per task `nstep`, `residual`, `converged`)."""
        sol = self.layer.last_solution
        return None if sol is None else next(iter(sol.info.values()))

    def extra_repr(self) -> str:
        return f"lam={self.lam}, step_size={self.step_size!r}, solver={self.solver!r}, backward={self.layer.backward_mode!r}"


def _check_step_size(step_size: object) -> bool:
    """Whether `step_size` is `"auto"`; a `ValueError` unless it is that or a positive finite number."""
    if isinstance(step_size, str):
        if step_size == "auto":
            return True
    elif not isinstance(step_size, bool) and isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0:
        return False
    raise ValueError(f"IMAML: step_size must be 'auto' or a positive finite number (the gradient step α), got {step_size!r}.")


_FALLBACK_HINTS = {
    "max_iter": "raise the solver's max_iter (the plain gradient steps get 4× as many) or loosen its tol",
    "stalled": "loosen the solver's tol (it may lie below what this dtype resolves) or raise lam (a more convex inner problem)",
    "diverged": "the curvature grew far beyond its estimate at θ: raise IMAML(power_iters=...) or pass a float step_size",
    "nonfinite": "the inner loss returned NaN/inf: check inner_loss, the model and the support data",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _AutoStep(SolverConfig):
    """The inner solver with the step of `step_size="auto"`; `IMAML.forward` puts a copy with the call's step
    in the layer before each solve.

    It passes the wrapped solver a preconditioner `P = α·1` (the diagonal of the map `w − P ⊙ R(w)`, see
    `il.Solver`) in place of the problem's fixed step. Tasks the solver leaves short of its tolerance
    (Anderson and Broyden can stall where `L_train` is not convex) are solved on from their best iterate
    by plain gradient steps of the descent size `1/(L + λ)` (`descent`), for up to
    `FALLBACK_FACTOR × max_iter` steps; the solve's `SolveInfo` counts both, and the wrapped solver's
    failure policy applies to the end result only.

    A `SolverConfig` itself, whose shared options are the wrapped solver's: `replace(tol=..., ...)` (as
    `il.testing.check_gradients` does to tighten a layer's solver) changes the wrapped solver and keeps the step.
    """

    FALLBACK_FACTOR: ClassVar[int] = 4

    inner: Any = None
    step: float = 1.0
    descent: float | None = None
    # How many tasks of the last solve the descent steps finished (shared by the copies `replace` makes).
    record: dict[str, int] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def around(cls, inner: Any, step: float = 1.0, descent: float | None = None, record: dict[str, int] | None = None) -> "_AutoStep":
        shared = {f.name: getattr(inner, f.name) for f in dataclasses.fields(SolverConfig)} if isinstance(inner, SolverConfig) else {}
        return cls(inner=inner, step=step, descent=descent, record={} if record is None else record, **shared)

    def replace(self, **changes: Any) -> "_AutoStep":
        """A copy with `inner`, `step` or `descent` changed; any other option is the wrapped solver's."""
        inner = changes.pop("inner", self.inner)
        step, descent = changes.pop("step", self.step), changes.pop("descent", self.descent)
        if changes:
            inner = inner.replace(**changes)
        return _AutoStep.around(inner, step, descent, self.record)

    def solve(self, residual_fn: Any, w0: torch.Tensor, *, precond: torch.Tensor | None = None, name: str = "solve",
              hints: Any = None, **options: Any) -> tuple[torch.Tensor, SolveInfo]:
        descent_step = self.descent
        fallback = descent_step is not None and isinstance(self.inner, SolverConfig) and not isinstance(self.inner, FixedPointIteration)
        first = self.inner.replace(on_failure="ignore") if fallback else self.inner
        step = torch.full((w0.shape[1],), self.step, dtype=w0.dtype, device=w0.device)
        w, info = first.solve(residual_fn, w0, precond=step, name=name, hints=hints, **options)
        self.record["finished_by_descent"] = 0
        if descent_step is None or not fallback or bool(info.converged.all()):
            return w, info
        self.record["finished_by_descent"] = int((~info.converged).sum())
        descent = FixedPointIteration(tol=self.inner.tol, max_iter=self.FALLBACK_FACTOR * self.inner.max_iter, stop=self.inner.stop,
                                      on_failure="ignore")
        # Converged tasks freeze at once (their residual is within tol at the start).
        step = torch.full((w0.shape[1],), descent_step, dtype=w0.dtype, device=w0.device)
        w, more = descent.solve(residual_fn, w, precond=step, name=name, hints=hints, **options)
        info = SolveInfo(nstep=info.nstep + more.nstep, residual=more.residual, converged=more.converged, nfe=info.nfe + more.nfe,
                         status=more.status)
        apply_failure_policy(info, name=f"{name} (then plain gradient steps from its best iterate)", tol=self.inner.tol,
                             max_iter=(1 + self.FALLBACK_FACTOR) * self.inner.max_iter, on_failure=self.inner.on_failure,
                             hints=_FALLBACK_HINTS)
        return w, info

    def __repr__(self) -> str:
        return f"{self.inner!r} (step_size='auto', last {self.step:.3g})"


def _start_at_theta(theta: torch.Tensor, support_x: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
    """Warm start each task's inner solve at the meta-parameters θ."""
    return theta
