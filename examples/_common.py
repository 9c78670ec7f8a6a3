"""Helpers the examples share: thread pinning, scikit-learn's digits as tensors, and figures."""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Iterator, Sequence

import torch

__all__ = ["pinned_threads", "digits_dataset", "held_out_split", "pyplot", "save_figure", "save_image_rows"]


@contextlib.contextmanager
def pinned_threads(threads: int = 1) -> Iterator[None]:
    """Run torch on `threads` CPU threads inside the block and restore the previous count after it.

    The examples' matrices are tiny: one thread beats several contending ones. Restoring matters
    because the test suite calls the examples' `main()` in its own process.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits (no download): images `(1797, 64)` float32 in `[0, 1]`, labels `(1797,)`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.as_tensor(data.data, dtype=torch.float32) / 16.0, torch.as_tensor(data.target)


def held_out_split(*tensors: torch.Tensor, n_test: int = 297, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Shuffle the rows of `tensors` alike (a seeded permutation) and split them: `(train, test)`, each a
    tuple with one entry per tensor; the first `n_test` shuffled rows are held out."""
    perm = torch.randperm(tensors[0].shape[0], generator=torch.Generator().manual_seed(seed))
    shuffled = [t[perm] for t in tensors]
    return tuple(t[n_test:] for t in shuffled), tuple(t[:n_test] for t in shuffled)


def pyplot() -> Any:
    """`matplotlib.pyplot` on the file-only Agg backend (the examples write PNGs; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | pathlib.Path) -> None:
    """Lay out, write (PNG at 120 dpi) and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def save_image_rows(path: str | pathlib.Path, rows: Sequence[tuple[str, torch.Tensor]], title: str = "", n: int = 10) -> None:
    """A grid of 8×8 digit images: one row per `(label, images (N, 64))`, the first `n` images of each."""
    plt = pyplot()
    n = min(n, *(images.shape[0] for _, images in rows))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.0 * n, 1.1 * len(rows) + 0.4), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.imshow(images[j].reshape(8, 8).clamp(0, 1).detach().cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
