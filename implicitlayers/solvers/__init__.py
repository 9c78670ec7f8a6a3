"""Batched quasi-Newton and fixed-point solvers sharing one loop (`_loop.iterate`).

The protocols `Solver`, `LinearSolver` and `IterativeMethod` (see `_protocol`) say what a solver must
offer; `WritesInto` marks a residual function that can write into a buffer.
"""

from ._base import IterativeSolver as IterativeSolver
from ._config import SolverConfig as SolverConfig
from ._functional import FunctionalSolution as FunctionalSolution
from ._functional import fixed_point as fixed_point
from ._functional import root as root
from ._info import SolveInfo as SolveInfo
from ._info import Status as Status
from ._info import apply_failure_policy as apply_failure_policy
from ._protocol import IterativeMethod as IterativeMethod
from ._protocol import IterativeState as IterativeState
from ._protocol import LinearSolver as LinearSolver
from ._protocol import Solver as Solver
from ._protocol import WritesInto as WritesInto
from ._workspace import clear_workspace as clear_workspace
from ._workspace import set_workspace_limit as set_workspace_limit
from ._workspace import workspace_bytes as workspace_bytes
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .fixed_point_iteration import FixedPointIteration as FixedPointIteration
from .scipy_root import ScipyRoot as ScipyRoot
