"""Runnable examples (`python examples/NAME.py`). A package only so that the scripts, the benchmarks and
`python -m implicitlayers demo` import their shared helpers as `examples._common` and
`examples.jiio_digits` (each script puts the repository root on `sys.path`); it is not installed."""
