"""The Triton filter_scores kernel, run by Triton's interpreter on CPU tensors, against the fp64
definition of each score.

TRITON_INTERPRET must be set before triton is first imported, hence at the very top; run this file
in its own process (`TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_interpret*.py`).
The interpreter takes about 1 ms per program (one per filter here), so the tensors stay small; the
kernel gets a 16-element block when interpreting, so rows still span several steps.
"""
import os
import sys

_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nasprune.kernels import filter_scores as fs  # noqa: E402

if _LATE or not fs.INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run "
                "`TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_interpret*.py`",
                allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# rows of 147 (unaligned starts), 8 and 36 (aligned, several blocks), 33, none, empty tensors
SHAPES = [(3, 3, 7, 7), (4, 8), (5, 4, 3, 3), (2, 33), (0, 4), (3, 0), (2, 2, 2, 3, 3)]


def _weights(dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        w = torch.randn(shape, generator=g).to(dtype)
        if layout == "channels_last" and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        elif layout == "strided" and w.dim() >= 2 and w.numel():
            w = torch.cat([w, w], dim=-1)[..., : w.shape[-1]]
        out.append(w)
    return out


def _definition(weights, grads, kind):
    out = []
    for i, w in enumerate(weights):
        for r in range(w.shape[0]):
            row = w[r].double().flatten()
            if kind == "l1":
                out.append(row.abs().sum())
            elif kind == "l2":
                out.append(row.square().sum().sqrt())
            else:
                out.append((row * grads[i][r].double().flatten()).sum().abs())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["l1", "l2", "taylor"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_fp64_definition(kind, dtype, layout):
    weights = _weights(dtype, layout)
    grads = _weights(dtype, layout, seed=1) if kind == "taylor" else []
    got = fs.filter_scores(weights, grads, kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _definition(weights, grads, kind), atol=1e-5,
                               rtol=1e-5)


def test_unaligned_rows_and_zero_filters():
    # a view starting one element in: every row starts off a 16-byte boundary
    base = torch.randn(5 * 8 + 1)
    w = base[1:].view(5, 8)
    w[2] = 0
    got = fs.filter_scores([w], [], "l1")
    torch.testing.assert_close(got, w.abs().sum(1), atol=1e-6, rtol=1e-6)
    assert got[2] == 0


def test_only_empty_rows():
    got = fs.filter_scores([torch.randn(0, 3), torch.randn(4, 0)], [], "l2")
    assert torch.equal(got, torch.zeros(4))


def test_cached_table_follows_the_data():
    w = torch.randn(4, 20)
    first = fs.filter_scores([w], [], "l2")
    w.mul_(2)  # same address and shape: the cached table is reused, the new values are read
    torch.testing.assert_close(fs.filter_scores([w], [], "l2"), 2 * first)
