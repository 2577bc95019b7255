"""nasprune: network pruning as architecture search, with fused kernels for the hot paths."""
from nasprune import ops, nn  # noqa: F401  (registers the ops' autograd and fake kernels)
from nasprune import flops, graph, models, slim  # noqa: F401
from nasprune.io import load, save  # noqa: F401

__version__ = "0.1.0"
