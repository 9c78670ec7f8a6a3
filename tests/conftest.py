"""Suite-wide settings.

- One intra-op thread: the tensors here are small, so OpenMP start-up costs more than it saves,
  and on an oversubscribed machine tiny kernels slow down by orders of magnitude.
- Hypothesis derandomised: every run of a given Hypothesis version tries the same examples, so a
  red run is reproducible and CI does not depend on luck.
"""

import matplotlib
import torch
from hypothesis import settings

matplotlib.use("Agg")
torch.set_num_threads(1)
settings.register_profile("implicitlayers-suite", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("implicitlayers-suite")
