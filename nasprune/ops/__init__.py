"""Functional API of the nasprune ops (schemas in csrc/nasprune.cpp, one file per op here)."""
from nasprune.ops import reference  # noqa: F401
from nasprune.ops._backend import backend, cuda_kernels_built, set_backend, use_backend  # noqa: F401
