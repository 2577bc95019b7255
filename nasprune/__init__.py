"""nasprune: network pruning as architecture search, with fused kernels for the hot paths."""
from nasprune import ops, nn  # noqa: F401  (registers the ops' autograd and fake kernels)

__version__ = "0.1.0"
