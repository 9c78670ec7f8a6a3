"""Quality-weighted fusion of client models, with no Flower import (unit-testable in milliseconds).

Gkillas et al. (EUSIPCO 2023) fuse the DEQs of heterogeneous clients by a weighted average that
accounts for "the different qualities of models"; their exact weights are not available to us. The
rule here is **ours**: client `i`, holding `n_i` training examples and reporting a quality `q_i`,
gets the weight

    w_i = n_i · g(q_i) / Σ_j n_j · g(q_j),

with `g(q) = q` for a quality where higher is better (validation accuracy) and `g(q) = 1 / (q + ε)`
for one where lower is better (the final fixed-point residual). With every `q_i` equal it is
exactly FedAvg's `w_i = n_i / Σ_j n_j`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

__all__ = ["quality_weights", "weighted_average"]


def quality_weights(
    num_examples: Sequence[float],
    quality: Sequence[float],
    *,
    lower_is_better: bool = False,
    eps: float = 1e-8,
) -> list[float]:
    """The fusion weights `w_i ∝ n_i · g(q_i)`, normalised to sum to one.

    Args:
        num_examples: `n_i`, each client's number of training examples (non-negative).
        quality: `q_i`, each client's quality (non-negative), e.g. its validation accuracy or its
            final fixed-point residual.
        lower_is_better: `False` (default) uses `g(q) = q`; `True` uses `g(q) = 1 / (q + eps)`, for a
            residual or a loss.
        eps: keeps `1 / (q + eps)` finite for a residual of exactly zero.

    Returns:
        One weight per client, in the input order, summing to one. If every `n_i · g(q_i)` is zero
        (for instance every client's validation accuracy is 0), the rule falls back to FedAvg's
        `n_i / Σ n_j`, since the qualities then carry no information.

    Raises:
        ValueError: on empty or mismatched inputs, a negative or non-finite value, or `Σ n_i = 0`.

    Example:
        ```python
        from implicitlayers.federated import quality_weights

        quality_weights([100, 100, 200], [0.9, 0.6, 0.75])   # [0.3, 0.2, 0.5]
        ```
    """
    if len(num_examples) == 0 or len(num_examples) != len(quality):
        raise ValueError(
            f"quality_weights: need one quality per client and at least one client, got {len(num_examples)} "
            f"example counts and {len(quality)} qualities."
        )
    for name, values in (("num_examples", num_examples), ("quality", quality)):
        bad = [(i, v) for i, v in enumerate(values) if isinstance(v, bool) or not math.isfinite(v) or v < 0]
        if bad:
            i, v = bad[0]
            raise ValueError(f"quality_weights: {name}[{i}] = {v!r}; every value must be finite and non-negative.")
    if not (0 < eps < math.inf):
        raise ValueError(f"quality_weights: eps must be positive and finite, got {eps!r}.")
    total_examples = float(sum(num_examples))
    if total_examples == 0:
        raise ValueError("quality_weights: every client reported 0 examples; there is nothing to weight.")
    gain = [1.0 / (q + eps) for q in quality] if lower_is_better else [float(q) for q in quality]
    # Each factor scaled by its largest first: n · g can overflow to inf (huge counts, a tiny eps), and
    # inf / inf is NaN. The weights are ratios, so the scaling cancels.
    n_max, g_max = max(float(n) for n in num_examples), max(gain)
    if g_max == 0 or not math.isfinite(g_max):  # (1 / (0 + eps) overflows only for a subnormal eps)
        if g_max == 0:
            return [float(n) / total_examples for n in num_examples]
        gain = [1.0 if math.isinf(g) else 0.0 for g in gain]
        g_max = 1.0
    raw = [(float(n) / n_max) * (g / g_max) for n, g in zip(num_examples, gain)]
    total = sum(raw)
    if total == 0:
        return [float(n) / total_examples for n in num_examples]
    return [r / total for r in raw]


def weighted_average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weighted average `Σ_i w_i θ_i` of client state dicts, entry by entry, dtypes kept.

    Floating-point (and complex) entries are accumulated in float64 (complex128) and cast back to
    their own dtype, so float32 stays float32 and float16 is not summed in half precision. Other
    entries (integer and boolean buffers: step counters, sparsity masks) have no meaningful average:
    they are copied from the client with the largest weight (the first one on a tie), so they keep
    their dtype and stay valid values.

    Args:
        state_dicts: one `state_dict()` per client, with the same keys, shapes and dtypes.
        weights: one weight per client; typically `quality_weights(...)`. They are used as given
            (not renormalised), so pass weights that sum to one for an average.

    Returns:
        A new state dict (fresh tensors on the first client's devices), in the first client's key order.

    Raises:
        ValueError: on mismatched lengths, keys, shapes or dtypes, or a non-finite weight.

    Example:
        ```python
        import torch
        from implicitlayers.federated import weighted_average

        a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
        b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(5)}
        fused = weighted_average([a, b], [0.25, 0.75])
        fused["w"], fused["steps"]   # tensor([2.5, 5.0]), tensor(5): b weighs more
        ```
    """
    if len(state_dicts) == 0 or len(state_dicts) != len(weights):
        raise ValueError(
            f"weighted_average: need one weight per state dict and at least one state dict, got "
            f"{len(state_dicts)} state dicts and {len(weights)} weights."
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weighted_average: weights must be finite, got {list(weights)}.")
    reference = state_dicts[0]
    for i, state in enumerate(state_dicts[1:], start=1):
        if set(state) != set(reference):
            missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
            raise ValueError(
                f"weighted_average: state dict {i} has different keys from state dict 0 "
                f"(missing {missing}, extra {extra}); all clients must share one architecture."
            )
        for key, tensor in state.items():
            ref = reference[key]
            if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
                raise ValueError(
                    f"weighted_average: entry {key!r} of state dict {i} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"but {tuple(ref.shape)} {ref.dtype} in state dict 0."
                )
    heaviest = max(range(len(weights)), key=lambda i: (weights[i], -i))
    fused: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        if ref.is_floating_point() or ref.is_complex():
            wide = torch.complex128 if ref.is_complex() else torch.float64
            total = torch.zeros(ref.shape, dtype=wide, device=ref.device)
            for state, weight in zip(state_dicts, weights):
                if weight == 0:  # a client weighted out (e.g. quality 0 after diverging) contributes nothing,
                    continue  # not even the NaN of its state (0 · NaN = NaN)
                total += float(weight) * state[key].detach().to(device=ref.device, dtype=wide)
            fused[key] = total.to(ref.dtype)
        else:
            fused[key] = state_dicts[heaviest][key].detach().clone()
    return fused
