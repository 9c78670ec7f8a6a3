"""Specification of the command line (`python -m implicitlayers demo|bench`): from a source checkout it runs
the demo and the benchmarks; without one (an installed wheel) it says what to do; the package itself
ships no training code."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

import implicitlayers.__main__ as cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_demo_is_not_part_of_the_package():
    assert importlib.util.find_spec("implicitlayers.demo") is None
    assert not (ROOT / "implicitlayers" / "demo.py").exists()


def test_the_readme_command_runs_from_another_directory(tmp_path):
    # `python -m implicitlayers demo jiio` as the README runs it (a fresh interpreter), here from a
    # directory that is not the checkout: an editable install finds examples/ beside the package.
    out = tmp_path / "figures"
    done = subprocess.run(
        [sys.executable, "-m", "implicitlayers", "demo", "jiio", "--epochs", "1", "--no-progress", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "held-out reconstruction MSE" in done.stdout
    assert (out / "jiio_demo.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, missing",
    [(["demo", "jiio"], "examples/jiio_digits.py"), (["bench", "deq"], "benchmarks/deq.py")],
)
def test_without_a_checkout_it_says_what_to_do(argv, missing, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_checkout_roots", lambda: [tmp_path])  # as from an installed wheel
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    message = str(exit_info.value.code)
    assert f"it is {missing} of a source checkout" in message
    assert 'python -m pip install -e ".[examples,bench]"' in message
    assert f"python -m implicitlayers {' '.join(argv)}" in message


def test_bench_runs_the_checkouts_benchmark_with_its_arguments(capsys):
    argv = list(sys.argv)
    cli.main(["bench", "backward", "--dim", "8", "--batch", "2", "--iters", "2", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert "backward / forward" in printed and "d=8, B=2" in printed
    assert sys.argv == argv  # the benchmark's command line was temporary


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "demo" in printed and "bench" in printed


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "jiio", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonexistent"])
    assert "invalid choice" in capsys.readouterr().err


def _benchmark(name: str):
    """Import `benchmarks/<name>.py` of this checkout as a module (its `main(argv)` returns its numbers)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def test_the_small_benchmark_returns_its_numbers(capsys):
    small = _benchmark("small")
    results = small.main(["--batch", "1", "3", "--repeats", "2", "--warmup", "0"])
    printed = capsys.readouterr().out
    assert "dim=4, B=1" in printed and "dim=4, B=3" in printed and "per iteration" in printed
    for batch in (1, 3):
        r = results[batch]
        # The forced solves run exactly their iterations (one more evaluation: the last residual).
        assert [r["nfe"][f"il.fixed_point, {n} iteration{'s' * (n > 1)}"] for n in (1, 10, 20)] == [2, 11, 21]
        assert r["nfe_bwd"]["ImplicitLayer forward + IFT backward"] >= 1
        for stat in ("median", "min"):
            d = r[stat]
            assert d["t_f"] > 0 and all(t > 0 for t in d["times"].values())
            assert "il.DEQ forward + IFT backward" in d["times"]


def test_deq_benchmark_at_equal_accuracy_matches_torchdeqs_gradient_error(capsys):
    pytest.importorskip("torchdeq")
    deq = _benchmark("deq")
    results = deq.main(["--hidden", "16", "--batch", "8", "--repeats", "1", "--equal-accuracy"])
    printed = capsys.readouterr().out
    assert "at equal tol" in printed and "at equal gradient error" in printed
    # The ladder stops at the first tolerance whose error is at most torchdeq's (or says it did not).
    assert results["tol_eq"] <= 1e-4 and results["time_ours_eq"] > 0
    assert results["reached_eq"] == (results["grad_err_eq"] <= results["grad_err_torchdeq"])
