"""implicitlayers: differentiable implicit problems (fixed points, roots, inner optimisation) for PyTorch.

Declare variables defined by fixed-point equations, root equations or inner objectives
(`Problem`), wrap them in an `ImplicitLayer`, and get solutions that are differentiable through
the implicit function theorem. DEQ, JIIO, iMAML and LyaDEQ are built-in instances.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import sets as sets
from .backward import IFT as IFT
from .backward import Phantom as Phantom
from .backward import Unroll as Unroll
from .errors import ConvergenceError as ConvergenceError
from .errors import ConvergenceWarning as ConvergenceWarning
from .layer import ImplicitLayer as ImplicitLayer
from .layer import Solution as Solution
from .problem import FixedPoint as FixedPoint
from .problem import Input as Input
from .problem import Maximize as Maximize
from .problem import Minimize as Minimize
from .problem import Problem as Problem
from .problem import Root as Root
from .problem import Variable as Variable
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import FixedPointIteration as FixedPointIteration
from .solvers import ScipyRoot as ScipyRoot
from .solvers import SolveInfo as SolveInfo
from .solvers import fixed_point as fixed_point
from .solvers import root as root

__version__ = "0.1.0"

# Heavier parts load on first use (they pull in more of torch, or optional packages).
_LAZY = {
    "linear": ("implicitlayers.linear", None),
    "nn": ("implicitlayers.nn", None),
    "robust": ("implicitlayers.robust", None),
    "testing": ("implicitlayers.testing", None),
    "DEQ": ("implicitlayers.models.deq", "DEQ"),
    "JIIO": ("implicitlayers.models.jiio", "JIIO"),
    "IMAML": ("implicitlayers.models.imaml", "IMAML"),
    "LyaDEQ": ("implicitlayers.models.lyadeq", "LyaDEQ"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'implicitlayers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
