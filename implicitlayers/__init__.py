"""implicitlayers: differentiable implicit problems (fixed points, roots, inner optimisation) for PyTorch.

Declare variables defined by fixed-point equations, root equations or inner objectives
(`Problem`), wrap them in an `ImplicitLayer`, and get solutions that are differentiable through
the implicit function theorem. DEQ, JIIO, iMAML and LyaDEQ are built-in instances.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and the API docs read; at run time each name loads on first use
    from . import linear as linear
    from . import nn as nn
    from . import robust as robust
    from . import sets as sets
    from . import solvers as solvers
    from . import testing as testing
    from .backward import IFT as IFT
    from .backward import Phantom as Phantom
    from .backward import Unroll as Unroll
    from .errors import ConvergenceError as ConvergenceError
    from .errors import ConvergenceWarning as ConvergenceWarning
    from .layer import ImplicitLayer as ImplicitLayer
    from .layer import Solution as Solution
    from .models.deq import DEQ as DEQ
    from .models.imaml import IMAML as IMAML
    from .models.jiio import JIIO as JIIO
    from .models.lyadeq import LyaDEQ as LyaDEQ
    from .models.weight_tied import WeightTied as WeightTied
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
    from .solvers import Status as Status
    from .solvers import fixed_point as fixed_point
    from .solvers import root as root

# Every public name and the module that defines it (a subpackage maps to itself): importing the package
# costs nothing until a name is used, so the pytest plugin (`implicitlayers.testing.plugin`, loaded in
# every pytest run of an environment where implicitlayers is installed) does not import torch.
_EXPORTS = {
    "linear": ".linear",
    "nn": ".nn",
    "robust": ".robust",
    "sets": ".sets",
    "solvers": ".solvers",
    "testing": ".testing",
    "IFT": ".backward",
    "Phantom": ".backward",
    "Unroll": ".backward",
    "ConvergenceError": ".errors",
    "ConvergenceWarning": ".errors",
    "ImplicitLayer": ".layer",
    "Solution": ".layer",
    "DEQ": ".models.deq",
    "IMAML": ".models.imaml",
    "JIIO": ".models.jiio",
    "LyaDEQ": ".models.lyadeq",
    "WeightTied": ".models.weight_tied",
    "FixedPoint": ".problem",
    "Input": ".problem",
    "Maximize": ".problem",
    "Minimize": ".problem",
    "Problem": ".problem",
    "Root": ".problem",
    "Variable": ".problem",
    "Anderson": ".solvers",
    "Broyden": ".solvers",
    "FixedPointIteration": ".solvers",
    "ScipyRoot": ".solvers",
    "SolveInfo": ".solvers",
    "Status": ".solvers",
    "fixed_point": ".solvers",
    "root": ".solvers",
}


__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'implicitlayers' has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    value = module if where == f".{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"
