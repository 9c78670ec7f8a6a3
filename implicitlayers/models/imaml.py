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
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..backward import IFT, Phantom, Unroll
from ..layer import ImplicitLayer, Solution
from ..problem import Input, Minimize, Problem, Variable
from ..solvers import Anderson, SolveInfo

__all__ = ["IMAML", "default_backward"]

InnerLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        solver: forward solver of the inner problem (default `il.Anderson(memory=5, tol=1e-5, max_iter=100)`
            on the gradient-step map `φ ← φ − step_size · R(φ)`); `il.Broyden` works on `R` directly.
        backward: `il.IFT(solver=il.linear.CG(...))` by default (`default_backward()`); `il.Phantom`
            and `il.Unroll` also apply.
        step_size: the gradient step α of the fixed-point map (Picard/Anderson). It must satisfy
            α < 2/(L + λ) with `L` the curvature of `L_train`; default `1/(λ + 1)`.

    !!! warning
        Use a smooth model (tanh, softplus, GELU). With ReLU the proximal minimiser can sit on a kink,
        where no gradient vanishes: the inner residual stalls and the implicit derivative is undefined.

    Attributes:
        last_solution: the `il.Solution` of the last call.

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
        step_size: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"IMAML: model must be an nn.Module (its parameters are θ), got {type(model).__name__}.")
        if not callable(inner_loss):
            raise TypeError(f"IMAML: inner_loss must be a callable (prediction, target) -> scalar, got {type(inner_loss).__name__}.")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"IMAML: lam must be a positive finite number, got {lam!r}.")
        self.model = model
        self.inner_loss = inner_loss
        self.lam = float(lam)
        trainable = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("IMAML: the model has no trainable parameters to adapt.")
        # Fixed at construction (evaluated inside every residual evaluation, so kept cheap).
        self._names = [n for n, _ in trainable]
        self._shapes = [tuple(s) for _, s in trainable]
        self._sizes = [math.prod(s) for s in self._shapes]
        step = 1.0 / (self.lam + 1.0) if step_size is None else step_size
        theta, sx, sy, phi = Input("theta"), Input("support_x"), Input("support_y"), Variable("phi")
        problem = Problem([Minimize(phi, self._objective, (phi, theta, sx, sy), step_size=step)])
        self.layer = ImplicitLayer(
            problem,
            inputs=[theta, sx, sy],
            outputs=[phi],
            solver=solver if solver is not None else Anderson(memory=5, tol=1e-5, max_iter=100),
            backward=backward if backward is not None else default_backward(),
            init={"phi": _start_at_theta},
        )
        # The objective is a bound method of this module, so the layer registered no module of its
        # own: `imaml.parameters()` lists exactly the model's parameters.

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

    # ------------------------------------------------------------------------------ calling
    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adapt to a meta-batch: `support_x` `(T, N, ...)`, `support_y` `(T, N, ...)`.

        Returns:
            Each adapted parameter by name, shape `(T, *param.shape)`, differentiable with respect to
            the model's parameters (and the support data) by the backward mode.
        """
        self._check_support(support_x, support_y)
        theta = self.flat_parameters().to(support_x.dtype)
        batch_theta = theta.expand(support_x.shape[0], theta.shape[0])
        try:
            (phi,) = self.layer(batch_theta, support_x, support_y)
        except RuntimeError as error:
            if "vmap" in str(error) or "shape" in str(error) or "size" in str(error):
                raise ValueError(
                    f"IMAML: evaluating inner_loss(model(support_x[t]), support_y[t]) failed for one task's support_x of "
                    f"shape {tuple(support_x.shape[1:])} and support_y of shape {tuple(support_y.shape[1:])}: {error}"
                ) from error
            raise
        return self.unflatten(phi)

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
        if support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                f"IMAML: support_x has {support_x.shape[0]} task(s) but support_y has {support_y.shape[0]}; "
                "both need the same leading task dimension T."
            )
        if support_x.shape[1] != support_y.shape[1]:
            raise ValueError(
                f"IMAML: support_x has {support_x.shape[1]} example(s) per task but support_y has {support_y.shape[1]}; "
                "the second dimension N (support examples) must match."
            )

    # ------------------------------------------------------------------------------ diagnostics
    @property
    def last_solution(self) -> Solution | None:
        """The `il.Solution` of the last call (`values["phi"]` is the packed `(T, P)` solution)."""
        return self.layer.last_solution

    @property
    def last_info(self) -> SolveInfo | None:
        """The forward `SolveInfo` of the last inner solve (per task `nstep`, `residual`, `converged`)."""
        sol = self.layer.last_solution
        return None if sol is None else next(iter(sol.info.values()))

    def extra_repr(self) -> str:
        return f"lam={self.lam}, solver={self.layer.solver!r}, backward={self.layer.backward_mode!r}"


def _start_at_theta(theta: torch.Tensor, support_x: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
    """Warm start each task's inner solve at the meta-parameters θ."""
    return theta
