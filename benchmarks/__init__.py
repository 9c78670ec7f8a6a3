"""Benchmarks (`python benchmarks/NAME.py` or `python -m implicitlayers bench NAME`). A package only so
that the scripts import their shared helpers as `benchmarks._common` (each puts the repository root on
`sys.path`); it is not installed."""
