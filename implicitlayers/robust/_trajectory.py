"""The solver's trajectory of a DEQ classifier, state by state, with the DEQ's own solver.

`DEQClassifier` fixes the anatomy the neural-dynamics tools need (Yang et al., ICML 2023): an encoder
that injects the image, an `il.DEQ`, and a head that reads a state. `SolverRun` drives the DEQ's solver
through its public protocol (`init`, then one `step` at a time), so every intermediate state is
visible and the input may change between steps; `IntermediateState` turns one state into a classifier.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..models.deq import DEQ
from ..nn import cached_weights
from ..solvers._base import IterativeSolver

__all__ = ["DEQClassifier", "IntermediateState", "SolverRun", "prediction_entropy"]

InputChange = Literal["lift", "continue", "restart"]


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy `−Σ p log p` of `softmax(logits)` over dimension 1, one value per sample `(B,)` (in nats)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


class DEQClassifier(nn.Module):
    """`logits = head(deq(encoder(x)))`: a classifier around an `il.DEQ`, with its states exposed.

    Args:
        encoder: maps the input `x` to the DEQ's input `u` (e.g. flatten and a linear injection).
        deq: the `il.DEQ` with `cell(z, u)`; its solver (an iterative one: Anderson, Broyden,
            FixedPointIteration) also drives [`states`][implicitlayers.robust.DEQClassifier.states].
        head: maps a state `z` to logits `(B, classes)`.
    """

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor], deq: DEQ, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        if not isinstance(deq, DEQ):
            raise TypeError(f"DEQClassifier: deq must be an il.DEQ, got {type(deq).__name__}.")
        for name, fn in (("encoder", encoder), ("head", head)):
            if not callable(fn):
                raise TypeError(f"DEQClassifier: {name} must be callable (an nn.Module or a function), got {type(fn).__name__}.")
        self.encoder, self.deq, self.head = encoder, deq, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the equilibrium, differentiable by the DEQ's backward mode."""
        return self.head(self.deq(self.encoder(x)))

    def states(self, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """The solver's states `z_0 (the start), z_1, …, z_steps` for input `x`, detached.

        Every sample takes every step (no per-sample stopping), so state `t` means the same budget for
        the whole batch.
        """
        with torch.no_grad(), cached_weights():
            run = SolverRun(self.deq, self.encoder(x))
            try:
                out = [run.z]
                for _ in range(_check_steps(steps, "DEQClassifier.states")):
                    run.step()
                    out.append(run.z)
            finally:
                run.close()
        return out


class SolverRun:
    """One solve of `z = cell(z, u)`, stepped by hand with the DEQ's solver (`init` once, then `step`).

    The state stays alive between steps, so the caller can read `z` after every step and change the
    input `u` mid-solve ([`change_input`][implicitlayers.robust.SolverRun.change_input]). Runs without
    gradient. The solver's state is made with gradient recording on, which makes the solvers keep their
    history in lists that a step replaces rather than overwrites; a copy of the state from before the
    last step is kept for the lift.

    Args:
        deq: the `il.DEQ`; its cell, start (`z_init`) and solver are used.
        u: the DEQ's input, `(B, ...)`.
    """

    def __init__(self, deq: DEQ, u: torch.Tensor) -> None:
        solver = deq.solver
        if not isinstance(solver, IterativeSolver):
            raise TypeError(
                f"SolverRun: the DEQ's solver must be an iterative solver with init/step (il.Anderson, il.Broyden, "
                f"il.FixedPointIteration), got {type(solver).__name__}."
            )
        self.deq, self.solver = deq, solver
        self.u = u.detach()
        z0 = _start(deq, self.u)
        self.shape = z0.shape
        self._fn = self._residual(self.u)
        self.state = self._init(z0.reshape(z0.shape[0], -1))
        self._before: object | None = None  # the state before the last step

    def _init(self, w: torch.Tensor) -> object:
        with torch.no_grad():
            r = self._fn(w)
        with torch.enable_grad():
            return self.solver.init(self._fn, w, r, None)

    @property
    def z(self) -> torch.Tensor:
        """The current state, shaped like the DEQ's `z`."""
        return self.state.w.reshape(self.shape)

    def residual_norm(self) -> torch.Tensor:
        """`‖z − cell(z, u)‖` per sample at the current state, for the current input (one evaluation)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self._fn(self.state.w), dim=1)

    def _residual(self, u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        cell, shape = self.deq.cell, self.shape

        def residual(w: torch.Tensor) -> torch.Tensor:
            return w - cell(w.reshape(shape), u).reshape(w.shape)

        return residual

    def step(self) -> None:
        """One solver step for every sample (no sample is frozen)."""
        self._before = copy.deepcopy(self.state)
        with torch.no_grad():
            self.state = self.solver.step(self._fn, self.state, None)

    def change_input(self, u: torch.Tensor, mode: InputChange = "lift") -> None:
        """Continue the solve for a new input `u`, from the current state `z_k`.

        Args:
            u: the new DEQ input, same shape as the old.
            mode: what the solver's history keeps.

                - `"lift"` ("lifting the orbit", Yang et al. 2023): the last step `z_{k−1} → z_k` is
                  taken again from the saved state, now evaluating the new residual at `z_k`, so the
                  solver's newest secant pair becomes `(z_k − z_{k−1}, R_new(z_k) − R_old(z_{k−1}))`;
                  every older pair is kept. For Broyden this is exactly the authors' rank-one
                  correction of the stored factors, written with the solver's public `step`.
                - `"continue"`: nothing changes but the residual function; the next step still follows
                  the old residual's direction, and its pair spans the change of input.
                - `"restart"`: the solver starts afresh at `z_k` (Broyden's estimate back to `diag(P)`,
                  Anderson's history emptied).
        """
        if mode not in ("lift", "continue", "restart"):
            raise ValueError(f"SolverRun.change_input: mode must be 'lift', 'continue' or 'restart', got {mode!r}.")
        if u.shape != self.u.shape:
            raise ValueError(f"SolverRun.change_input: the new input has shape {tuple(u.shape)}, the old {tuple(self.u.shape)}.")
        self.u = u.detach()
        self._fn = self._residual(self.u)
        if mode == "continue":
            return
        if mode == "lift" and self._before is not None:
            self.solver.release(self.state)
            with torch.no_grad():
                self.state = self.solver.step(self._fn, self._before, None)
            self._before = None  # the saved state has become the current one
            return
        self.solver.release(self.state)
        self.state = self._init(self.state.w)
        self._before = None

    def close(self) -> None:
        """Hand the solver's buffers back; the run must not be stepped afterwards."""
        self.solver.release(self.state)


class IntermediateState(nn.Module):
    """Classify from solver state `state`, optionally followed by `unroll` damped steps with gradient.

    `logits = head(z)` with `z_0 = z_state` (detached) and `unroll` times `z ← (1 − λ) z + λ cell(z, u)`.

    - `unroll=0`, `state=T−1`: the *early-state defence* (predict from the last-but-one state of a
      `T`-step solve). It has no input gradient; attack it with `grad_model=`.
    - `unroll=K > 0`: the surrogate-gradient attack of Yang et al. (their Eq. 11), for `pgd(...,
      grad_model=IntermediateState(model, state=i, unroll=K))`; with `state` at the end of the solve it
      is a phantom gradient.

    Args:
        model: the `DEQClassifier`.
        state: the solver step `t >= 0` whose state is read.
        unroll: damped steps after it, recorded by autograd (gradient reaches `x` through `u`).
        damping: `λ ∈ (0, 1]`.
    """

    def __init__(self, model: DEQClassifier, state: int, *, unroll: int = 0, damping: float = 0.5) -> None:
        super().__init__()
        if not isinstance(model, DEQClassifier):
            raise TypeError(f"IntermediateState: model must be a DEQClassifier, got {type(model).__name__}.")
        if isinstance(state, bool) or not isinstance(state, int) or state < 0:
            raise ValueError(f"IntermediateState: state must be an integer >= 0, got {state!r}.")
        if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 0:
            raise ValueError(f"IntermediateState: unroll must be an integer >= 0, got {unroll!r}.")
        self.model, self.state, self.unroll, self.damping = model, state, unroll, _check_damping(damping, "IntermediateState")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with cached_weights():
            u = self.model.encoder(x)
            with torch.no_grad():
                run = SolverRun(self.model.deq, u)
                try:
                    for _ in range(self.state):
                        run.step()
                    z = run.z
                finally:
                    run.close()
            z = damped_steps(self.model.deq.cell, z, u, self.unroll, self.damping)
            return self.model.head(z)

    def extra_repr(self) -> str:
        return f"state={self.state}, unroll={self.unroll}, damping={self.damping}"


def damped_steps(cell: Callable, z: torch.Tensor, u: torch.Tensor, k: int, damping: float) -> torch.Tensor:
    """`k` times `z ← (1 − λ) z + λ cell(z, u)`, recorded by autograd when it is on."""
    for _ in range(k):
        z = (1 - damping) * z + damping * cell(z, u)
    return z


def _start(deq: DEQ, u: torch.Tensor) -> torch.Tensor:
    """The DEQ's `z_init` for input `u`: zeros like `u`, a (broadcast) tensor, or a callable of `u`."""
    spec = deq.z_init
    if spec is None:
        return torch.zeros_like(u)
    if not isinstance(spec, torch.Tensor):
        start = spec(u)
    elif spec.dim() > 1 and spec.shape[0] == u.shape[0]:
        start = spec  # batched, as `il.DEQ` reads it
    else:
        start = spec.expand(u.shape[0], *spec.shape)
    return start.detach().to(dtype=u.dtype, device=u.device).clone()


def _check_steps(steps: object, who: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{who}: steps must be an integer >= 0, got {steps!r}.")
    return steps


def _check_damping(damping: object, who: str) -> float:
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0 < damping <= 1:
        raise ValueError(f"{who}: damping must lie in (0, 1], got {damping!r}.")
    return float(damping)
