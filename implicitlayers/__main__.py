"""Command line: `python -m implicitlayers demo jiio`, `python -m implicitlayers bench NAME [ARGS...]`
(also the `implicitlayers` console script)."""

from __future__ import annotations

import argparse
import pathlib
import runpy
import sys
from typing import Sequence

_BENCHMARKS = ("solvers", "backward", "deq", "jiio", "meta")

_DEMOS = {
    "jiio": "train a DEQ decoder on scikit-learn's digits by JIIO latent inference (no encoder; ~20 s on 2 CPU "
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
    demo.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench = commands.add_parser(
        "bench", help="run a benchmark from a source checkout's benchmarks/ folder",
        description="Run benchmarks/NAME.py of a source checkout; further arguments go to the benchmark.",
    )
    bench.add_argument("name", choices=_BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    return parser


def _run_benchmark(name: str, args: list[str]) -> None:
    """Run `benchmarks/<name>.py` found beside the package (editable install) or in the working directory."""
    candidates = [pathlib.Path(__file__).resolve().parent.parent / "benchmarks", pathlib.Path.cwd() / "benchmarks"]
    for folder in candidates:
        script = folder / f"{name}.py"
        if script.is_file():
            sys.argv = [str(script), *args]
            runpy.run_path(str(script), run_name="__main__")
            return
    raise SystemExit(f"benchmarks/{name}.py was not found: run this from a source checkout of implicitlayers.")


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
    elif args.command == "bench":
        _run_benchmark(args.name, args.args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
