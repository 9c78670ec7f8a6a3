"""implicitlayers: differentiable implicit problems (fixed points, roots, inner optimisation) for PyTorch.

Declare variables defined by fixed-point equations, root equations or inner objectives
(`Problem`), wrap them in an `ImplicitLayer`, and get solutions that are differentiable through
the implicit function theorem. DEQ, JIIO, iMAML and LyaDEQ are built-in instances.
"""

from __future__ import annotations

from . import linear as linear
from . import nn as nn
from . import robust as robust
from . import sets as sets
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
