"""Command line: `python -m implicitlayers demo jiio` (also the `implicitlayers` console script)."""

from __future__ import annotations

import argparse
from typing import Sequence

_DEMOS = {
    "jiio": "train a DEQ decoder on scikit-learn's digits by JIIO latent inference (no encoder; ~1 min on 2 CPU "
    "cores), print the held-out reconstruction MSE and write a PNG of targets vs reconstructions",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicitlayers",
        description="implicitlayers: differentiable implicit problems for PyTorch.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    demo = commands.add_parser("demo", help="run a short end-to-end demo", description="Run a short end-to-end demo.")
    demo.add_argument("name", choices=sorted(_DEMOS), help="; ".join(f"{k}: {v}" for k, v in _DEMOS.items()))
    demo.add_argument("--out", default="outputs", help="directory for the figure (default: outputs)")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m implicitlayers` and of the `implicitlayers` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1:
            _parser().error("--epochs must be at least 1")
        try:
            from .demo import run_demo
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise SystemExit(f"the demo needs the dev extra (scikit-learn, matplotlib, tqdm): pip install 'implicitlayers[dev]' ({err})")
        run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
