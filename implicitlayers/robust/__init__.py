"""Attacks and robust training for implicit models.

Everything here takes a classifier `model(x) -> logits`, an `nn.Module` or any callable, so it applies
to a DEQ, a LyaDEQ or an ordinary network alike. Inputs live in `[0, 1]` by default (`clamp=(0, 1)`);
pass `clamp=None` for unbounded features. Norms, projections and step directions are per sample.

- Attacks: [`fgsm`][implicitlayers.robust.fgsm] and [`pgd`][implicitlayers.robust.pgd], ℓ∞ and ℓ2,
  random start. Attacks run the model in eval mode (its modes are restored afterwards) and differentiate
  with respect to the input only, so they never touch parameters' `.grad`.
- Evaluation: [`accuracy`][implicitlayers.robust.accuracy] and
  [`robust_accuracy`][implicitlayers.robust.robust_accuracy] (`{eps: accuracy}`, `0.0` clean).
- Training: [`trades_loss`][implicitlayers.robust.trades_loss] (TRADES) and
  [`adversarial_loss`][implicitlayers.robust.adversarial_loss] (PGD adversarial training).
- Regulating the neural dynamics (Yang et al., ICML 2023), for a
  [`DEQClassifier`][implicitlayers.robust.DEQClassifier] `head(deq(encoder(x)))`:
  [`random_intermediate_states`][implicitlayers.robust.random_intermediate_states] (a training mode for
  any model with implicit layers), [`EntropyDefence`][implicitlayers.robust.EntropyDefence] (input
  entropy reduction at inference, Broyden's factors lifted across input changes by
  [`SolverRun`][implicitlayers.robust.SolverRun]), [`evaluate_states`][implicitlayers.robust.evaluate_states]
  and [`IntermediateState`][implicitlayers.robust.IntermediateState] (per-state accuracy and entropy,
  early-state defence, surrogate gradients), and [`autoattack`][implicitlayers.robust.autoattack]
  (AutoAttack through the optional `torchattacks`).

**Attack gradients for implicit models.** By default the attack differentiates `model` itself, so for
a DEQ the input gradient is whatever its backward mode gives: the exact implicit gradient (IFT), a
phantom gradient, or backpropagation through unrolled iterations. Yang et al. (ICML 2023) show that
gradients taken at *intermediate* solver states, or through a few unrolled damped steps, often make
stronger attacks on DEQs than the exact gradient at the fixed point. `grad_model=` supplies such a
surrogate: the attack follows its gradient while `model` remains the classifier under attack (and, with
`pgd(..., select="best")`, chooses per sample the iterate that does most harm to `model`).

```python
import torch
import implicitlayers as il
import implicitlayers.robust as robust

# A small DEQ classifier of 8×8 images in [0, 1] (train it first; the calls below work either way).
inject, head, mix = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10), torch.nn.Linear(32, 32, bias=False)
torch.nn.init.normal_(mix.weight, std=0.1)
cell = lambda z, u: torch.tanh(mix(z) + u)
model = torch.nn.Sequential(inject, il.DEQ(cell, solver=il.Anderson(tol=1e-4, max_iter=50)), head)
x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
X_test, y_test = torch.rand(16, 64), torch.randint(0, 10, (16,))

x_adv = robust.pgd(model, x, y, eps=0.1, steps=20)                       # ℓ∞ PGD-20
# A surrogate sharing the classifier's cell: 4 unrolled Picard steps, differentiated by backprop.
early = il.DEQ(cell, solver=il.FixedPointIteration(max_iter=4, on_failure="ignore"), backward=il.Unroll())
x_adv = robust.pgd(model, x, y, eps=0.1, grad_model=lambda x: head(early(inject(x))), select="best")
acc = robust.robust_accuracy(model, (X_test, y_test), attack="pgd", eps_list=[0.05, 0.1, 0.2])
loss = robust.trades_loss(model, x, y, eps=0.1, beta=6.0)                 # then loss.backward()
```
"""

from ._attacks import fgsm as fgsm
from ._attacks import pgd as pgd
from ._autoattack import autoattack as autoattack
from ._entropy import DefenceTrace as DefenceTrace
from ._entropy import EntropyDefence as EntropyDefence
from ._evaluate import accuracy as accuracy
from ._evaluate import robust_accuracy as robust_accuracy
from ._per_state import StateReport as StateReport
from ._per_state import evaluate_states as evaluate_states
from ._random_states import RandomIntermediateStates as RandomIntermediateStates
from ._random_states import random_intermediate_states as random_intermediate_states
from ._training import adversarial_loss as adversarial_loss
from ._training import trades_loss as trades_loss
from ._trajectory import DEQClassifier as DEQClassifier
from ._trajectory import IntermediateState as IntermediateState
from ._trajectory import SolverRun as SolverRun
from ._trajectory import prediction_entropy as prediction_entropy

__all__ = [
    "DEQClassifier",
    "DefenceTrace",
    "EntropyDefence",
    "IntermediateState",
    "RandomIntermediateStates",
    "SolverRun",
    "StateReport",
    "accuracy",
    "adversarial_loss",
    "autoattack",
    "evaluate_states",
    "fgsm",
    "pgd",
    "prediction_entropy",
    "random_intermediate_states",
    "robust_accuracy",
    "trades_loss",
]
