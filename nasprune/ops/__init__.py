"""Functional API of the nasprune ops. Each op has one file here (Python wrapper, autograd and fake
registration); its schema is in csrc/nasprune.cpp, its kernels in csrc/cpu/<op>.cpp,
csrc/cuda/<op>.cu and kernels/<op>.py, its reference math in nasprune/ops/reference.py."""
from nasprune.ops import reference  # noqa: F401
from nasprune.ops._backend import backend, cuda_kernels_built, set_backend, use_backend  # noqa: F401
from nasprune.ops.channel_stats import channel_stats  # noqa: F401
from nasprune.ops.filter_scores import filter_scores  # noqa: F401
from nasprune.ops.gate_epilogue import gate_epilogue, gate_epilogue_backward  # noqa: F401
from nasprune.ops.gumbel import gumbel_topk  # noqa: F401
from nasprune.ops.width_aggregate import width_aggregate, width_aggregate_backward  # noqa: F401
from nasprune.ops import _backend as _b

_b.select_default_backend()
