"""The Triton filter_scores kernel, run by Triton's interpreter on CPU tensors, against the fp64
definition of each score.

TRITON_INTERPRET must be set before triton is first imported, hence at the very top; run this file
in its own process (`TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_interpret*.py`).
The interpreter takes about 1 ms per program (one per filter here), so the tensors stay small; the
kernel gets a 16-element block when interpreting, so rows still span several steps.
"""
from tests.kernels._triton_interp import interpreted_kernels

fs = interpreted_kernels("filter_scores")  # sets TRITON_INTERPRET before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.ops._score_cases import (  # noqa: E402
    DTYPES,
    KINDS,
    LAYOUTS,
    definition,
    make_case,
)

# rows of 147 (unaligned starts), 8 and 36 (aligned, several blocks), 33, none, empty tensors
SHAPES = [(3, 3, 7, 7), (4, 8), (5, 4, 3, 3), (2, 33), (0, 4), (3, 0), (2, 2, 2, 3, 3)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_fp64_definition(kind, dtype, layout):
    weights, grads = make_case(SHAPES, kind, dtype, layout)
    got = fs.filter_scores(weights, grads or [], kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), definition(weights, grads, kind), atol=1e-5,
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
