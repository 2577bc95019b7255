"""`python -m nasprune.env`: what is built and usable here (C++ CPU kernels, CUDA C++ kernels,
Triton, the device) and the versions behind it."""
from __future__ import annotations

import platform
import sys

import torch

OPS = ("channel_stats", "gate_epilogue", "gate_epilogue_backward", "width_aggregate",
       "width_aggregate_backward", "filter_scores")


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"nasprune::{op}", key)
    except RuntimeError:  # the op is not defined: no compiled library
        return False


def report() -> dict:
    import nasprune
    from nasprune.ops import _backend

    info = {
        "nasprune": nasprune.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU-only build)",
        "compiled extension": "yes" if _backend.HAS_C else f"no ({_backend._C_ERROR})",
        "C++ CPU kernels": ", ".join(op for op in OPS if _has_kernel(op, "CPU")) or "none",
        "CUDA C++ kernels": "built" if _backend.cuda_kernels_built() else "not built",
    }
    try:
        import triton
        info["Triton"] = triton.__version__
    except ImportError:
        info["Triton"] = "not installed"
    info["CUDA backend in use"] = _backend.backend() if _backend.HAS_C else "reference"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        info["device"] = f"CPU only ({platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def main() -> int:
    info = report()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
