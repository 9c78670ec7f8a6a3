"""The JIIO digits demo: a DEQ decoder trained by JIIO latent inference, with no encoder.

Shared by `python -m implicitlayers demo jiio` (which runs `run_demo` from a source checkout),
`examples/jiio_generative.py`, `examples/jiio_inverse.py` and `benchmarks/jiio.py`. Needs the
`examples` extra (scikit-learn, tqdm, matplotlib).

The decoder is the small replica of the paper's generative model: the state `z ∈ R^d` is the
equilibrium of `z = tanh(W z + U x + b)` for a latent code `x ∈ R^k`, and the image is
`sigmoid(V z + c)`. Training has no encoder: for each batch of images, JIIO finds the latent code and
the equilibrium jointly (`min_x ‖head(z) − image‖² + λ‖x‖²` subject to the DEQ equation), and the
decoder's parameters take one Adam step on the same objective at `(x*, z*)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Sequence

import torch
from torch import nn

import implicitlayers as il

from ._common import digits_dataset, held_out_split, pinned_threads, save_image_rows

__all__ = [
    "DigitsDecoder",
    "DecoderConfig",
    "load_digits_split",
    "reconstruction_jiio",
    "train_decoder",
    "evaluate_mse",
    "run_demo",
    "squared_error_objective",
    "example_arguments",
    "example_setup",
]


class DigitsDecoder(nn.Module):
    """`z = tanh(W z + U x + b)`, image `= sigmoid(V z + c)`.

    `W` is rescaled to Frobenius norm at most `gamma` (< 1) in every call, which bounds its spectral
    norm, so the equilibrium exists, is unique and the damped iteration contracts.
    """

    def __init__(self, latent: int = 12, state: int = 96, pixels: int = 64, gamma: float = 0.9) -> None:
        super().__init__()
        self.latent, self.state, self.pixels, self.gamma = latent, state, pixels, gamma
        self.W = nn.Parameter(torch.randn(state, state) * 0.3 / state**0.5)
        self.U = nn.Parameter(torch.randn(state, latent) / latent**0.5)
        self.b = nn.Parameter(torch.zeros(state))
        self.V = nn.Parameter(torch.randn(pixels, state) / state**0.5)
        self.c = nn.Parameter(torch.zeros(pixels))

    def weight(self) -> torch.Tensor:
        norm = torch.linalg.vector_norm(self.W)
        return self.W * (self.gamma / torch.clamp(norm, min=self.gamma))

    def cell(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.weight().T + x @ self.U.T + self.b)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z @ self.V.T + self.c)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, tol: float = 1e-5, max_iter: int = 100) -> torch.Tensor:
        """Images of latent codes `x` `(B, k)` by a plain forward DEQ solve (for sampling)."""
        sol = il.fixed_point(lambda z: self.cell(z, x), x.new_zeros(x.shape[0], self.state),
                          solver=il.Anderson(memory=5, tol=tol, max_iter=max_iter, on_failure="ignore"))
        return self.head(sol.value)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and JIIO settings of the digits demo (defaults tuned for a 2-core CPU)."""

    latent: int = 12
    state: int = 96
    prior: float = 0.01  # λ of the latent prior λ‖x‖²
    step_size: float = 0.2  # α of the latent update x ← x − α ∇
    jiio_iters: int = 40
    jiio_tol: float = 1e-3
    epochs: int = 30
    batch: int = 64
    lr: float = 5e-3
    seed: int = 0


def squared_error_objective(prior: float):
    """`objective(image_out, image, x) = ‖image_out − image‖² + prior ‖x‖²` per sample (summed, as in the reference)."""

    def objective(out: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).flatten(1).sum(1) + prior * (x**2).sum(1)

    return objective


def reconstruction_jiio(decoder: DigitsDecoder, cfg: DecoderConfig, *, objective=None, backward=None,
                        max_iter: int | None = None, tol: float | None = None) -> il.JIIO:
    """The JIIO latent-inference layer of a decoder (an objective other than the squared error may be given)."""
    solver = il.Anderson(memory=5, tol=tol or cfg.jiio_tol, max_iter=max_iter or cfg.jiio_iters, on_failure="ignore")
    return il.JIIO(
        decoder.cell, decoder.head, objective or squared_error_objective(cfg.prior), input_shape=decoder.latent,
        solver=solver, backward=backward or il.IFT(first_order=True), state_shape=decoder.state, step_size=cfg.step_size,
    )


def load_digits_split(n_test: int = 297, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits' images `(N, 64)` in `[0, 1]`, shuffled and split into train / held-out."""
    (train,), (test,) = held_out_split(digits_dataset()[0], n_test=n_test, seed=seed)
    return train, test


def example_arguments(doc: str, epochs: int, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of the examples that train this decoder: `--epochs`, `--fast`, `--out`, `--no-progress`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--fast", action="store_true", help="two epochs on a subset (for tests, ~10 s)")
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def example_setup(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, DecoderConfig]:
    """Create `--out`; the train / held-out images (a subset with `--fast`) and the decoder's config."""
    os.makedirs(args.out, exist_ok=True)
    train, test = load_digits_split()
    if args.fast:
        train, test = train[:384], test[:64]
    return train, test, DecoderConfig(epochs=2 if args.fast else args.epochs)


def train_decoder(train: torch.Tensor, cfg: DecoderConfig, *, progress: bool = True, time_limit: float | None = None) -> tuple[DigitsDecoder, list[float]]:
    """Train a decoder by JIIO latent inference; returns it and the per-epoch training MSE.

    The gradient is `il.IFT(first_order=True)`: the latent `x*` is held constant, which is exact here
    by the envelope theorem (the training loss *is* the inner objective, so `∂loss/∂x* = 0` at the
    inner optimum); only the DEQ equation is differentiated, its adjoint solve warm-started from `μ*`.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    decoder = DigitsDecoder(cfg.latent, cfg.state, train.shape[1])
    jiio = reconstruction_jiio(decoder, cfg)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="JIIO training", disable=not progress)
    for _ in bar:
        perm = torch.randperm(train.shape[0], generator=gen)
        total, count = 0.0, 0
        for i in range(0, train.shape[0], cfg.batch):
            images = train[perm[i : i + cfg.batch]]
            x_star, z_star = jiio(images)
            # The inner objective at (x*, z*), per pixel: the envelope theorem makes first_order exact.
            loss = jiio.inner_objective(x_star, z_star, images).mean() / images.shape[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                total += float(((decoder.head(z_star) - images) ** 2).sum())
                count += images.numel()
        history.append(total / count)
        bar.set_postfix(mse=f"{history[-1]:.4f}")
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    return decoder, history


@torch.no_grad()
def evaluate_mse(decoder: DigitsDecoder, images: torch.Tensor, cfg: DecoderConfig, *, max_iter: int = 100) -> dict[str, Any]:
    """Held-out reconstruction: JIIO infers each image's latent; returns MSE per pixel and the reconstructions."""
    jiio = reconstruction_jiio(decoder, cfg, max_iter=max_iter)
    sol = jiio.solve(images)
    recon = decoder.head(sol["z"])
    info = next(iter(sol.info.values()))
    return {
        "mse": float(((recon - images) ** 2).mean()),
        "reconstructions": recon,
        "latents": sol["x"],
        "converged": float(info.converged.float().mean()),
        "nfe": info.nfe,
    }


def run_demo(out: str = "outputs", *, epochs: int = 30, progress: bool = True) -> dict[str, Any]:
    """The short demo: train for `epochs` epochs (about 20 s on 2 quiet CPU cores), print the held-out MSE
    and write `out/jiio_demo.png` (targets vs reconstructions)."""
    os.makedirs(out, exist_ok=True)
    cfg = DecoderConfig(epochs=epochs)
    train, test = load_digits_split()
    start = time.perf_counter()
    with pinned_threads(1):
        decoder, history = train_decoder(train, cfg, progress=progress)
        result = evaluate_mse(decoder, test, cfg)
    seconds = time.perf_counter() - start
    path = os.path.join(out, "jiio_demo.png")
    save_image_rows(path, [("target", test), ("JIIO", result["reconstructions"])],
                    title=f"JIIO latent inference, held-out MSE {result['mse']:.4f}")
    baseline = float(((test - train.mean(0)) ** 2).mean())
    print(f"held-out reconstruction MSE (per pixel): {result['mse']:.4f}  (mean-image baseline {baseline:.4f})")
    print(f"JIIO converged on {100 * result['converged']:.0f}% of held-out images; {seconds:.1f} s in all")
    print(f"figure: {path}")
    return {"mse": result["mse"], "baseline_mse": baseline, "train_mse": history, "seconds": seconds, "figure": path}
