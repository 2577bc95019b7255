"""Loads the compiled kernels and chooses the CUDA backend.

CPU tensors always run the C++ kernels of `nasprune._C`. CUDA tensors run either the CUDA C++
kernels (registered from C++ when the extension was built with CUDA) or the Triton kernels in
`nasprune.kernels` (registered here, on top, while selected). Choose with the environment variable
NASPRUNE_CUDA_BACKEND=cuda|triton, `set_backend(name)` or `with use_backend(name):`. Without a
compiled extension every op falls back to `nasprune.ops.reference`, with a one-time warning.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable

import torch

try:
    from nasprune import _C  # noqa: F401  (loading the library registers the schemas and kernels)

    HAS_C = True
    _C_ERROR = None
except ImportError as err:  # a source checkout that was never built, or an ABI mismatch
    HAS_C = False
    _C_ERROR = err

BACKENDS = ("cuda", "triton")
_TRITON_IMPLS: dict[str, Callable] = {}
_triton_lib: torch.library.Library | None = None
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def reference_fallback(op: str) -> bool:
    """True (after one warning) when `op` must run the pure-PyTorch reference."""
    if HAS_C:
        return False
    warn_once("no_C", f"nasprune._C is not built ({_C_ERROR}); nasprune.ops.{op} and the other ops "
                      "run the slow pure-PyTorch reference. Build with "
                      "`pip install --no-build-isolation .`.")
    return True


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def register_triton(op: str, fn: Callable) -> None:
    """Declares `fn` as the Triton implementation of nasprune::`op` for CUDA tensors."""
    _TRITON_IMPLS[op] = fn
    if _triton_lib is not None:
        _triton_lib.impl(op, fn, "CUDA")


def backend() -> str:
    """The backend CUDA tensors run on now: "cuda" (CUDA C++) or "triton"."""
    return "triton" if _triton_lib is not None else "cuda"


def set_backend(name: str) -> None:
    global _triton_lib
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if not HAS_C:
        raise RuntimeError("nasprune._C is not built, so no backend can be selected")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package, which is not installed")
        if _triton_lib is None:
            _triton_lib = torch.library.Library("nasprune", "IMPL")
            for op, fn in _TRITON_IMPLS.items():
                _triton_lib.impl(op, fn, "CUDA")
    else:
        if not _cuda_registered_in_cpp:
            raise RuntimeError("backend 'cuda' needs the CUDA C++ kernels, but nasprune._C was built "
                               "without CUDA (no nvcc or a CPU-only torch at build time)")
        if _triton_lib is not None:
            _triton_lib._destroy()
            _triton_lib = None


@contextlib.contextmanager
def use_backend(name: str):
    previous = backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


_cuda_registered_in_cpp = HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(
    "nasprune::gate_epilogue", "CUDA")


def cuda_kernels_built() -> bool:
    """Whether the extension was built with its CUDA C++ kernels."""
    return _cuda_registered_in_cpp


def select_default_backend() -> None:
    """Applies NASPRUNE_CUDA_BACKEND, or picks Triton when the CUDA C++ kernels were not built.
    Called once the op modules have declared their Triton implementations."""
    if not HAS_C:
        return
    wanted = os.environ.get("NASPRUNE_CUDA_BACKEND", "").strip().lower()
    if wanted:
        set_backend(wanted)
    elif not _cuda_registered_in_cpp and triton_available():
        set_backend("triton")
