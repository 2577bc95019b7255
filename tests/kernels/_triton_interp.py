"""Entry into Triton's interpreter for the test_triton_interpret_*.py files.

Triton decides interpreter or compiler when it decorates a function, its own library included, so
TRITON_INTERPRET must be set before triton is first imported in the process, and a triton
imported earlier without it cannot interpret. Imports neither triton nor torch at module level.
"""
import importlib
import os
import sys

import pytest

RUN = "TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_interpret*.py"
_late = False  # triton was seen imported without the variable: stays so for the process


def interpreted_kernels(name: str):
    """Set TRITON_INTERPRET=1 and return nasprune.kernels.<name>, or skip the calling test module
    when triton is missing or was imported before the variable was set. Call it at the very top
    of the test module, before torch or triton is imported there."""
    global _late
    _late = _late or ("triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1")
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    module = importlib.import_module(f"nasprune.kernels.{name}")
    if _late or not module.INTERPRET:
        pytest.skip(f"triton was imported before TRITON_INTERPRET=1 was set; run `{RUN}`",
                    allow_module_level=True)
    return module
