"""Building blocks for implicit models: normalised weights, regularisers, convex and orthogonal layers."""

from ._cache import cached_weights as cached_weights
from .icnn import ICNN as ICNN
from .icnn import PICNN as PICNN
from .lyapunov import ConditionalLyapunovFunction as ConditionalLyapunovFunction
from .lyapunov import LyapunovFunction as LyapunovFunction
from .norms import spectral_norm as spectral_norm
from .norms import weight_norm as weight_norm
from .orthogonal import OrthogonalLinear as OrthogonalLinear
from .regularizers import jacobian_regularizer as jacobian_regularizer
from .regularizers import spectral_radius as spectral_radius
