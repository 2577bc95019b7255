import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NASPRUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Absolute and relative tolerance per dtype for elementwise outputs compared with the reference.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if layout == "strided":  # a non-contiguous view with the same values
        wide = torch.cat([t, torch.empty_like(t)], dim=-1)
        return wide[..., : t.shape[-1]]
    raise ValueError(layout)
