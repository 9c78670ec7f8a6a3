"""Input entropy reduction (Yang et al., ICML 2023, Sec. 3.2): an inference-time defence along the solve.

Every `every` solver steps, `input_steps` signed-gradient steps move the input to lower the entropy of
the prediction made from the current state, `H(softmax(head(f(z_t, u(x')))))`, each projected onto the
ε-ball around the given input and the valid range; the solve then continues from `z_t` for the new input
(the solver's history lifted, not restarted; see
[`SolverRun.change_input`][implicitlayers.robust.SolverRun.change_input]). The prediction is `head(z_T)`.

The defence has no gradient of its own (sign steps), so an attack that sees it needs BPDA (Athalye et
al. 2018): in the backward pass the purification `x ↦ x'` is taken as the identity and the classifier is
differentiated at `x'` by its own backward mode (the exact IFT by default).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from ..nn import cached_weights
from ._common import (
    Clamp,
    check_clamp,
    check_eps,
    check_positive_int,
    check_step_size,
    input_gradient,
    project,
)
from ._trajectory import DEQClassifier, InputChange, SolverRun, prediction_entropy

__all__ = ["DefenceTrace", "EntropyDefence"]


@dataclasses.dataclass
class DefenceTrace:
    """What one defended solve did (every tensor detached).

    Attributes:
        x: the final input `(B, ...)`.
        logits: the prediction `head(z_T)`.
        inputs: the input after every signed-gradient step, the given input first.
        entropy: mean entropy of `head(f(z_t, u(x')))` over the batch, per input update: before each
            signed-gradient step and after the last (`input_steps + 1` values per update).
        states: the solver's states `z_0, …, z_T`.
        residual: `‖z_T − f(z_T, u(x))‖` per sample, for the final input.
    """

    x: torch.Tensor
    logits: torch.Tensor
    inputs: list[torch.Tensor]
    entropy: list[float]
    states: list[torch.Tensor]
    residual: torch.Tensor


class _Straight(torch.autograd.Function):
    """BPDA: the value of the defended logits, the gradient of the classifier at the purified input."""

    @staticmethod
    def forward(defended: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
        return defended.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


class EntropyDefence(nn.Module):
    """A `DEQClassifier` whose solve reduces the prediction entropy of its input along the way.

    `defended(x)` runs `steps` solver steps in chunks of `every`; after each chunk but the last,
    `input_steps` steps `x' ← Π(x' − step_size · sign ∇ₓ' H(softmax(head(f(z_t, u(x'))))))`, `Π` the
    projection onto the ℓ∞ ball of radius `eps` around the given `x` and onto `clamp`; then the solve
    continues for `u(x')` (`on_input_change`, see
    [`SolverRun.change_input`][implicitlayers.robust.SolverRun.change_input]). It returns `head(z_T)`.

    Called with an input that requires gradient (inside an attack), the logits carry the BPDA gradient:
    the identity through the purification, then the classifier's own backward at the purified input
    (one extra solve). That is the *adaptive* attack on this defence:
    `robust.pgd(defended, x, y, eps=...)`.

    Args:
        model: the `DEQClassifier`.
        eps: radius of the ℓ∞ ball the input may move in (the paper's 8/255 on CIFAR-10).
        steps: solver steps in all (the paper's 8).
        every: solver steps between input updates (the paper's 2).
        input_steps: signed-gradient steps per update (the paper's 10).
        step_size: length of each signed step; default `eps / 4` (the paper's 2/255 for 8/255).
        on_input_change: `"lift"` (default, the paper's), `"continue"` or `"restart"`.
        clamp: the valid input range, or `None`.
    """

    def __init__(
        self,
        model: DEQClassifier,
        *,
        eps: float,
        steps: int = 8,
        every: int = 2,
        input_steps: int = 10,
        step_size: float | None = None,
        on_input_change: InputChange = "lift",
        clamp: Clamp = (0.0, 1.0),
    ) -> None:
        super().__init__()
        who = "EntropyDefence"
        if not isinstance(model, DEQClassifier):
            raise TypeError(f"{who}: model must be a DEQClassifier, got {type(model).__name__}.")
        if on_input_change not in ("lift", "continue", "restart"):
            raise ValueError(f"{who}: on_input_change must be 'lift', 'continue' or 'restart', got {on_input_change!r}.")
        self.model = model
        self.eps = check_eps(eps, who)
        self.steps = check_positive_int(steps, "steps", who)
        self.every = check_positive_int(every, "every", who)
        self.input_steps = check_positive_int(input_steps, "input_steps", who)
        self.step_size = self.eps / 4 if step_size is None else check_step_size(step_size, who)
        self.on_input_change = on_input_change
        self.clamp = clamp

    def defend(self, x: torch.Tensor) -> DefenceTrace:
        """Run the defended solve on `x` and return everything it did."""
        who = "EntropyDefence"
        clamp = check_clamp(self.clamp, x, who)
        model, x = self.model, x.detach()
        with cached_weights():
            with torch.no_grad():
                run = SolverRun(model.deq, model.encoder(x))
            x_cur, inputs, entropy, states = x, [x], [], [run.z]
            try:
                done = 0
                while done < self.steps:
                    for _ in range(min(self.every, self.steps - done)):
                        run.step()
                        states.append(run.z)
                    done = len(states) - 1
                    if done >= self.steps:
                        break
                    objective = functools.partial(self._entropy, run.z)
                    for _ in range(self.input_steps):
                        grad, value = input_gradient(objective, x_cur, who)
                        entropy.append(float(value.mean()))
                        x_cur = project(x, x_cur - self.step_size * grad.sign(), self.eps, "linf", clamp)
                        inputs.append(x_cur)
                    with torch.no_grad():
                        entropy.append(float(objective(x_cur).mean()))
                        run.change_input(model.encoder(x_cur), self.on_input_change)
                with torch.no_grad():
                    logits = model.head(run.z)
                residual = run.residual_norm()
            finally:
                run.close()
        return DefenceTrace(x=x_cur, logits=logits, inputs=inputs, entropy=entropy, states=states, residual=residual)

    def _entropy(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Entropy of the prediction one cell step from the state `z`, for input `x`: `H(softmax(head(f(z, u(x)))))`."""
        model = self.model
        return prediction_entropy(model.head(model.deq.cell(z, model.encoder(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The defended logits; with gradient (BPDA) when `x` requires it and gradient recording is on."""
        trace = self.defend(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return trace.logits
        purified = x + (trace.x - x).detach()  # the identity in the backward pass
        return _Straight.apply(trace.logits, self.model(purified))

    def extra_repr(self) -> str:
        return (
            f"eps={self.eps}, steps={self.steps}, every={self.every}, input_steps={self.input_steps}, "
            f"step_size={self.step_size}, on_input_change={self.on_input_change!r}"
        )
