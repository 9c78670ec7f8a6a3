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
