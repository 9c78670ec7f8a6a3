"""Command line: `python -m implicitlayers demo jiio`, `python -m implicitlayers bench NAME [ARGS...]`
(also the `implicitlayers` console script).

The demos and benchmarks are scripts of a source checkout (`examples/`, `benchmarks/`), not part of
the installed package: the commands find them beside the package (an editable install) or in the
working directory, and say what to do when there is no checkout (an installed wheel).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import runpy
import sys
from typing import Sequence

_BENCHMARKS = ("solvers", "backward", "deq", "jiio", "meta", "small")

_DEMOS = {
    "jiio": "train a DEQ decoder on scikit-learn's digits by JIIO latent inference (no encoder; ~20 s on 2 CPU "
    "cores), print the held-out reconstruction MSE and write a PNG of targets vs reconstructions",
}

_NO_CHECKOUT = (
    "{what} is not part of the installed package: it is {path} of a source checkout of implicitlayers, and no "
    "checkout was found beside the package or in the working directory ({cwd}). Clone the repository and, "
    "in its root directory, run:\n"
    '    python -m pip install -e ".[examples,bench]"\n'
    "    python -m implicitlayers {command}"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicitlayers",
        description="implicitlayers: differentiable implicit problems for PyTorch.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    demo = commands.add_parser(
        "demo", help="run a short end-to-end demo (from a source checkout)",
        description="Run a short end-to-end demo: examples/jiio_digits.py of a source checkout.",
    )
    demo.add_argument("name", choices=sorted(_DEMOS), help="; ".join(f"{k}: {v}" for k, v in _DEMOS.items()))
    demo.add_argument("--out", default="outputs", help="directory for the figure (default: outputs)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench = commands.add_parser(
        "bench", help="run a benchmark (from a source checkout)",
        description="Run benchmarks/NAME.py of a source checkout; further arguments go to the benchmark.",
    )
    bench.add_argument("name", choices=_BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    return parser


def _checkout_roots() -> list[pathlib.Path]:
    """Where a source checkout may be: the folder above the package (an editable install), then the working directory."""
    return [pathlib.Path(__file__).resolve().parent.parent, pathlib.Path.cwd()]


def _checkout_file(relative: str, what: str, command: str) -> pathlib.Path:
    """The first checkout root that holds `relative`, or exit with what to do instead."""
    for root in _checkout_roots():
        if (root / relative).is_file():
            return root
    raise SystemExit(_NO_CHECKOUT.format(what=what, path=relative, cwd=pathlib.Path.cwd(), command=command))


def _run_demo(name: str, out: str, epochs: int, progress: bool) -> None:
    root = _checkout_file(f"examples/{name}_digits.py", f"The demo {name!r}", f"demo {name}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # `examples` is a package at the checkout's root
    try:
        demo = importlib.import_module(f"examples.{name}_digits")
    except ImportError as err:
        raise SystemExit(
            f"the demo needs the examples extra (scikit-learn, matplotlib, tqdm): python -m pip install -e \".[examples]\" ({err})"
        ) from err
    demo.run_demo(out, epochs=epochs, progress=progress)


def _run_benchmark(name: str, args: list[str]) -> None:
    """Run `benchmarks/<name>.py` of the checkout as `__main__`, with `args` as its command line."""
    root = _checkout_file(f"benchmarks/{name}.py", f"The benchmark {name!r}", f"bench {name}")
    script = root / "benchmarks" / f"{name}.py"
    argv = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m implicitlayers` and of the `implicitlayers` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1:
            parser.error("--epochs must be at least 1")
        _run_demo(args.name, args.out, args.epochs, not args.no_progress)
    elif args.command == "bench":
        _run_benchmark(args.name, args.args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
