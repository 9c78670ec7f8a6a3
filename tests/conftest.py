"""Suite-wide settings: one intra-op thread (the tensors here are small, so OpenMP start-up costs
more than it saves, and an oversubscribed machine slows tiny kernels by orders of magnitude)."""

import matplotlib
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)
