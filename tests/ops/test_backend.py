"""Backend selection, the reference fallback without a compiled extension, and the env report."""
import subprocess
import sys
import textwrap

import pytest
import torch

from nasprune import ops
from nasprune.ops import _backend
from tests.conftest import ROOT


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of \('cuda', 'triton'\), got 'cudnn'"):
        ops.set_backend("cudnn")


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
def test_use_backend_switches_cuda_kernel_and_restores():
    before = ops.backend()
    with ops.use_backend("triton"):
        assert ops.backend() == "triton"
        assert torch._C._dispatch_has_kernel_for_dispatch_key("nasprune::gate_epilogue", "CUDA")
    assert ops.backend() == before
    if ops.cuda_kernels_built():  # the C++ CUDA kernel is back in place
        assert torch._C._dispatch_has_kernel_for_dispatch_key("nasprune::gate_epilogue", "CUDA")


def test_cuda_backend_needs_cuda_kernels():
    if ops.cuda_kernels_built():
        ops.set_backend("cuda")
        assert ops.backend() == "cuda"
    else:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            ops.set_backend("cuda")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_without_compiled_extension_ops_fall_back_to_reference_with_one_warning():
    out = _run("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "nasprune._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import nasprune
            from nasprune import ops
            from nasprune.ops import reference
            z = torch.randn(2, 3, 4, 4)
            p = torch.rand(3)
            y = ops.gate_epilogue(z, p, p, p, "relu")
            ops.channel_stats(z)
        assert torch.equal(y, reference.gate_epilogue(z, p, p, p, "relu"))
        msgs = [str(w.message) for w in caught if "not built" in str(w.message)]
        print(len(msgs), msgs[0][:60])
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 nasprune._C is not built (blocked for the test)")


def test_env_report_lists_kernels():
    out = subprocess.run([sys.executable, "-m", "nasprune.env"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "C++ CPU kernels" in out.stdout
    assert "channel_stats, gate_epilogue, gate_epilogue_backward" in out.stdout
    assert torch.__version__ in out.stdout
