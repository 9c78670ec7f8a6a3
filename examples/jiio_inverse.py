"""Inverse problems with a JIIO-trained DEQ decoder: inpainting and denoising on scikit-learn's digits.

A decoder (`DigitsDecoder` of `examples/jiio_digits.py`) is first trained by JIIO latent inference on clean
training images (as in `jiio_generative.py`, shorter). Then, for each held-out image, the latent code
is inferred by `il.JIIO` against the *corrupted* observation only:

- **inpainting**: a 3×3 square at a random position is unobserved; the objective is the squared error
  over the observed pixels, `Σ m ⊙ (head(z) − y)² + λ‖x‖²` (the mask travels with the target);
- **denoising**: `y = clean + σ ε`, σ ∈ {0.2, 0.4}; the objective is the squared error to `y`.

The reconstruction `head(z*)` is compared with the clean image by PSNR = −10 log10(MSE) (pixels in
[0, 1]), next to the PSNR of the corrupted observation itself (missing pixels filled with 0).

Outputs: `jiio_inverse.png` (clean / corrupted / JIIO rows per task) in `--out` (default `outputs/`).

Run: `python examples/jiio_inverse.py [--epochs 30] [--fast] [--out outputs]`
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
from typing import Sequence

import torch
from tqdm.auto import tqdm

import implicitlayers as il

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `examples` importable
    sys.path.insert(0, str(ROOT))
from examples._common import pinned_threads, save_image_rows  # noqa: E402
from examples.jiio_digits import example_arguments, example_setup, reconstruction_jiio, train_decoder  # noqa: E402


def psnr(estimate: torch.Tensor, clean: torch.Tensor) -> float:
    """PSNR in dB over the whole set (pixels in [0, 1]), as the reference code computes it."""
    return -10.0 * math.log10(float(((estimate - clean) ** 2).mean()))


def masked_objective(prior: float):
    """Squared error over observed pixels; `target` is `(B, 2, 64)`: the observation and its 0/1 mask."""

    def objective(out: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        observed, mask = target[:, 0], target[:, 1]
        return (mask * (out - observed) ** 2).sum(1) + prior * (x**2).sum(1)

    return objective


def square_masks(n: int, size: int = 3, side: int = 8, seed: int = 0) -> torch.Tensor:
    """`(n, side²)` masks: 1 observed, 0 inside one random `size × size` square per image."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.ones(n, side, side)
    rows = torch.randint(0, side - size + 1, (n,), generator=gen)
    cols = torch.randint(0, side - size + 1, (n,), generator=gen)
    for i in range(n):
        masks[i, rows[i] : rows[i] + size, cols[i] : cols[i] + size] = 0
    return masks.reshape(n, side * side)


def main(argv: Sequence[str] | None = None) -> dict:
    args = example_arguments(__doc__, 30, argv)
    train, test, cfg = example_setup(args)
    gen = torch.Generator().manual_seed(1)
    tasks = {
        "inpainting 3x3": (test * square_masks(test.shape[0]), square_masks(test.shape[0])),
        "denoising 0.2": (test + 0.2 * torch.randn(test.shape, generator=gen), torch.ones_like(test)),
        "denoising 0.4": (test + 0.4 * torch.randn(test.shape, generator=gen), torch.ones_like(test)),
    }
    results: dict[str, dict[str, float]] = {}
    rows: list[tuple[str, torch.Tensor]] = []  # figure rows: clean, corrupted, JIIO per task
    with pinned_threads(1):
        decoder, _ = train_decoder(train, cfg, progress=not args.no_progress)
        jiio = reconstruction_jiio(decoder, cfg, objective=masked_objective(cfg.prior), max_iter=100)
        for task, (observed, mask) in tqdm(tasks.items(), desc="inverse problems", disable=args.no_progress):
            with torch.no_grad():
                sol = jiio.solve(torch.stack([observed, mask], 1))
                recon = decoder.head(sol["z"])
            info: il.SolveInfo = next(iter(sol.info.values()))
            results[task] = {
                "psnr_corrupted": psnr(observed.clamp(0, 1), test),
                "psnr_jiio": psnr(recon, test),
                "converged": float(info.converged.float().mean()),
            }
            rows += [("clean", test), (task, observed), ("JIIO", recon)]
    figure = os.path.join(args.out, "jiio_inverse.png")
    save_image_rows(figure, rows, n=8)
    print(f"{'task':<16}{'PSNR corrupted':>16}{'PSNR JIIO':>12}")
    for task, r in results.items():
        print(f"{task:<16}{r['psnr_corrupted']:>13.2f} dB{r['psnr_jiio']:>9.2f} dB")
    print(f"figure: {figure}")
    return {"tasks": results, "figure": figure}


if __name__ == "__main__":
    main()
