"""`LyaDEQ`: a DEQ whose fixed point is made globally Lyapunov stable by a learned convex Lyapunov function.

A reconstruction of Chu, Wei, Liu, Zhao (and Miyatake), "Learning Robust Deep Equilibrium Models" /
"Lyapunov-Stable Deep Equilibrium Models" (arXiv 2304.12707), whose full text was not available:
the stable-dynamics projection of Kolter & Manek (2019) applied to the DEQ's continuous-time
dynamics `ż = f(z, x) − z`, with the Lyapunov function centred at the DEQ's own fixed point, then
an orthogonal linear layer. See `docs/concepts/lyadeq.md` for the derivation, and why the centre
must be a fixed point of `f` (any other centre either collapses the inputs or leaves the projected
field discontinuous at its only equilibrium). Both equilibria are solved by `ImplicitLayer`; this
module holds no solver or backward code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..backward import IFT, Phantom, Unroll
from ..layer import ImplicitLayer, Solution
from ..nn import LyapunovFunction, OrthogonalLinear
from ..problem import FixedPoint, Input, Problem, Variable
from ..solvers import Anderson, SolveInfo

__all__ = ["LyaDEQ", "project_dynamics"]

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class _ProjectedStep(nn.Module):
    """The fixed-point map `z ↦ z + h · F̃(z; anchor, x)` of the projected dynamics (an explicit Euler step)."""

    def __init__(self, cell: Cell, lyapunov: nn.Module, alpha: float, step: float) -> None:
        super().__init__()
        self.cell = cell
        self.lyapunov = lyapunov
        self.alpha = alpha
        self.step = step

    def dynamics(self, z: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nominal = self.cell(z, x) - z
        # `value_and_grad` uses `torch.func`: ∇V is itself differentiable (the IFT of this block
        # differentiates F̃, hence ∇V, so it needs V's second derivatives).
        value, grad = self.lyapunov.value_and_grad(z, anchor)
        return project_dynamics(nominal, value, grad, self.alpha)

    def forward(self, z: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z + self.step * self.dynamics(z, anchor, x)


class LyaDEQ(nn.Module):
    """A Lyapunov-stable deep equilibrium layer: `lyadeq(x) = Q z*` with `z*` a globally stable fixed point.

    Reconstructed from Chu et al. (arXiv 2304.12707; full text unavailable — see
    `docs/concepts/lyadeq.md`). With `f = cell` and the learned convex Lyapunov function
    `V(z; c) = σ(g(z) − g(c)) + ε‖z − c‖²` ([`LyapunovFunction`][implicitlayers.nn.LyapunovFunction],
    `g` an input-convex network), the layer solves two equations in one `il.Problem`:

    1. the **anchor** `c*(x) = f(c*, x)` — the plain DEQ fixed point, so the centre of `V` depends on
       the input and distinct inputs keep distinct equilibria (no collapse onto one point);
    2. the **state** `z* = z* + h F̃(z*)`, the equilibrium of the projected dynamics
       `ż = F̃(z) = F(z) − ∇V(z; c*) ReLU(∇V(z; c*)ᵀ F(z) + α V(z; c*)) / ‖∇V(z; c*)‖²` with
       `F(z) = f(z, x) − z`, solved from `z_init`.

    Along `ż = F̃(z)`, `dV/dt ≤ −α V`, so `V(z(t)) ≤ e^{−αt} V(z(0))` from every start: `c*` is the
    unique equilibrium of the projected dynamics and it is globally exponentially stable (in the sense
    of `V`). Hence `z* = c*`: the projection certifies and enforces the stability of the DEQ's own fixed
    point — the state returns to it after any perturbation of the initial state — without moving it.
    Finally `Q` ([`OrthogonalLinear`][implicitlayers.nn.OrthogonalLinear], square) maps `z*` to the
    output features; put the classification head after it.

    !!! warning "What the projection does not do"
        Because `z* = c*`, the value of the layer, and hence its clean and adversarial predictions, are
        those of the plain DEQ with the same cell (and the task loss gives `V` no gradient); see the
        concepts page for the measurements. Centres other than a fixed point of `f` (the injection, a
        learned map of `x`) make the projected field discontinuous at its only equilibrium, and the
        solver does not converge there.

    Args:
        cell: the DEQ map `(z, x) -> z'`, `z` of shape `(B, dim)`. An `nn.Module` is registered, so its
            parameters appear in `parameters()`.
        dim: the dimension of `z`.
        lyapunov: the Lyapunov function, a module with `value_and_grad(z, z_ref) -> (V (B,), ∇V (B, dim))`
            that is positive definite around `z_ref`; default `il.nn.LyapunovFunction(dim)`.
        alpha: the guaranteed decay rate `α > 0` of `V`.
        step: the Euler step `h > 0` of the fixed-point map `z ↦ z + h F̃(z)` (its fixed points do not
            depend on `h`; smaller is more robust for plain iteration, larger converges in fewer steps).
        orthogonal: apply the orthogonal layer `Q` (`False` returns `z*` itself, for ablations).
        solver: forward solver for both equations (default `il.Anderson(m=5, tol=1e-4, max_iter=50)`).
        backward: `il.IFT()` (default), `il.Phantom(...)` or `il.Unroll()`.
        z_init: start of both solves: `None` (zeros `(B, dim)`), a tensor (`(dim,)` or `(B, dim)`) or a
            callable of `x` returning `(B, dim)`.

    Example:
        ```python
        import torch
        import implicitlayers as il

        class Cell(torch.nn.Module):
            def __init__(self, d):
                super().__init__()
                self.linear = torch.nn.Linear(d, d)

            def forward(self, z, u):
                return torch.tanh(0.5 * self.linear(z) + u)

        lyadeq = il.LyaDEQ(Cell(8), 8, alpha=0.1)
        features = lyadeq(torch.randn(4, 8))     # (4, 8) = Q z*
        z_star = lyadeq.equilibrium(torch.randn(4, 8))
        ```
    """

    def __init__(
        self,
        cell: Cell,
        dim: int,
        *,
        lyapunov: nn.Module | None = None,
        alpha: float = 0.1,
        step: float = 0.5,
        orthogonal: bool = True,
        solver: Any = None,
        backward: IFT | Phantom | Unroll | None = None,
        z_init: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"LyaDEQ: cell must be a callable (z, x) -> z' or an nn.Module, got {type(cell).__name__}.")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"LyaDEQ: dim must be a positive integer (the size of z), got {dim!r}.")
        if not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"LyaDEQ: alpha must be a positive number (the decay rate of V), got {alpha!r}.")
        if not isinstance(step, (int, float)) or not step > 0:
            raise ValueError(f"LyaDEQ: step must be a positive number (the Euler step h), got {step!r}.")
        if lyapunov is None:
            lyapunov = LyapunovFunction(dim)
        elif not callable(getattr(lyapunov, "value_and_grad", None)):
            raise TypeError(
                "LyaDEQ: lyapunov must provide value_and_grad(z, z_ref) -> (V, ∇V), like il.nn.LyapunovFunction; "
                f"got {type(lyapunov).__name__}."
            )
        elif getattr(lyapunov, "dim", dim) != dim:
            raise ValueError(f"LyaDEQ: lyapunov acts on dimension {lyapunov.dim}, but dim={dim}.")
        if z_init is not None and not (isinstance(z_init, torch.Tensor) or callable(z_init)):
            raise TypeError(f"LyaDEQ: z_init must be None, a tensor or a callable of x, got {type(z_init).__name__}.")
        self.dim = dim
        self.alpha = float(alpha)
        self.step = float(step)
        self.cell = cell
        self.lyapunov = lyapunov
        self.projected_step = _ProjectedStep(cell, lyapunov, self.alpha, self.step)
        self.orthogonal = OrthogonalLinear(dim, dim) if orthogonal else None
        self.z_init = z_init
        x, anchor, z = Input("x"), Variable("anchor"), Variable("z")
        self.layer = ImplicitLayer(
            Problem([FixedPoint(anchor, cell, (anchor, x)), FixedPoint(z, self.projected_step, (z, anchor, x))]),
            inputs=[x],
            outputs=[z],
            solver=solver if solver is not None else Anderson(m=5, tol=1e-4, max_iter=50),
            backward=backward,
            init={"anchor": self._start, "z": self._start},
        )

    # ------------------------------------------------------------------------------ calling
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The features `Q z*` (or `z*` with `orthogonal=False`) for the batch `x`, shape `(B, dim)`."""
        z = self.equilibrium(x)
        return z if self.orthogonal is None else self.orthogonal(z)

    def equilibrium(self, x: torch.Tensor) -> torch.Tensor:
        """The stable equilibrium `z*` (before the orthogonal layer), differentiable by the backward mode."""
        return self.solve(x).values["z"]

    def solve(self, x: torch.Tensor) -> Solution:
        """Both solves: `.values["anchor"]` and `.values["z"]` (differentiable), `.info` per block."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LyaDEQ: x must be a torch.Tensor with a leading batch dimension, got {type(x).__name__}.")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"LyaDEQ: x must have a non-empty leading batch dimension, got shape {tuple(x.shape)}.")
        # The layer computes normalised weights once per solve and keeps a detached last solution.
        return self.layer.solve(x)

    # ------------------------------------------------------------------------------ the dynamics
    def projected_dynamics(self, z: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`F̃(z; anchor, x)`, the projected vector field whose equilibrium the layer returns, `(B, dim)`."""
        return self.projected_step.dynamics(z, anchor, x)

    def lyapunov_value(self, z: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """`V(z; anchor)`, shape `(B,)`."""
        return self.lyapunov.value_and_grad(z, anchor)[0]

    # ------------------------------------------------------------------------------ diagnostics
    @property
    def last_solution(self) -> Solution | None:
        """The `il.Solution` of the last call (detached values), or `None` before the first."""
        return self.layer.last_solution

    @property
    def last_info(self) -> dict[str, SolveInfo] | None:
        """Forward `SolveInfo` of the last call by block: the anchor's solve, then the projected state's."""
        solution = self.layer.last_solution
        return None if solution is None else dict(solution.info)

    @property
    def nfe(self) -> int:
        """Batched evaluations of the last forward call, both solves together (0 before the first call)."""
        info = self.last_info
        return 0 if info is None else sum(i.nfe for i in info.values())

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.z_init
        if spec is None:
            return x.new_zeros(x.shape[0], self.dim)
        start = spec(x) if callable(spec) and not isinstance(spec, torch.Tensor) else spec
        if not isinstance(start, torch.Tensor):
            raise TypeError(f"LyaDEQ: z_init must return a tensor, got {type(start).__name__}.")
        if start.shape == (self.dim,):
            start = start.expand(x.shape[0], self.dim)
        if start.shape != (x.shape[0], self.dim):
            raise ValueError(f"LyaDEQ: z_init gave shape {tuple(start.shape)}; expected ({x.shape[0]}, {self.dim}) or ({self.dim},).")
        return start.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, alpha={self.alpha}, step={self.step}, solver={self.layer.solver!r}"
