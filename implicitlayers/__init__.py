"""implicitlayers: differentiable implicit problems (fixed points, roots, inner optimisation) for PyTorch."""

from .errors import ConvergenceError as ConvergenceError
from .errors import ConvergenceWarning as ConvergenceWarning
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import FixedPointIteration as FixedPointIteration
from .solvers import ScipyRoot as ScipyRoot
from .solvers import SolveInfo as SolveInfo
from .solvers import fixed_point as fixed_point
from .solvers import root as root

__version__ = "0.1.0"
