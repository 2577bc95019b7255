"""Layout view, tile choices and launch-size helpers shared by the Triton kernels.

An (N, C, *) tensor is seen as (outer, C, inner), as in csrc/common.h: NCHW-contiguous tensors
have outer = N and inner = prod(*); channels_last 4D tensors (and any tensor with inner == 1) have
outer = N * prod(*) and inner = 1, the channel index varying fastest ("channels last" kernels).
Other strides are made contiguous first.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

# Read once, at import: the autotune config lists are built when the kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (TILE elements per program step, num_warps) tried by the autotuner on a GPU. The interpreter gets
# exactly one small tile, so tiny test shapes still take several tiles and loop iterations.
GPU_TILES = ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
INTERPRET_TILE = 64
MIN_TILE = INTERPRET_TILE if INTERPRET else min(t for t, _ in GPU_TILES)
MAX_TILE = INTERPRET_TILE if INTERPRET else max(t for t, _ in GPU_TILES)


def tile_configs() -> list[triton.Config]:
    """Autotune configs over the TILE meta-parameter: several on a GPU, exactly one when
    interpreting (the interpreter cannot benchmark)."""
    if INTERPRET:
        return [triton.Config({"TILE": INTERPRET_TILE}, num_warps=1)]
    return [triton.Config({"TILE": t}, num_warps=w) for t, w in GPU_TILES]


@dataclass(frozen=True)
class View:
    outer: int
    channels: int
    inner: int
    channels_last: bool
    memory_format: torch.memory_format

    @property
    def per_channel(self) -> int:
        return self.outer * self.inner


def channel_view(z: torch.Tensor) -> View:
    n = z.shape[0]
    inner = math.prod(z.shape[2:])
    cl = (z.dim() == 4 and not z.is_contiguous()
          and z.is_contiguous(memory_format=torch.channels_last))
    fmt = torch.channels_last if cl else torch.contiguous_format
    if cl or inner == 1:
        return View(n * inner, z.shape[1], 1, True, fmt)
    return View(n, z.shape[1], inner, False, fmt)


def in_layout(t: torch.Tensor, view: View) -> torch.Tensor:
    """`t` in the memory layout `view` chose (a no-op when already there)."""
    return t.contiguous(memory_format=view.memory_format)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def inner_block(inner: int) -> int:
    """Columns per tile row for channels-first kernels: a power of two <= MIN_TILE (so every TILE
    config holds at least one row). Among the widths that pad a row by <= 1/32 more than the
    tightest one, the widest wins; below 64 elements rows get too short for full cache lines."""
    cap = min(MIN_TILE, next_pow2(inner))
    widths = []
    b = cap
    while b >= min(64, cap):
        widths.append(b)
        b //= 2
    tightest = min(triton.cdiv(inner, b) * b for b in widths)
    return next(b for b in widths if triton.cdiv(inner, b) * b * 32 <= tightest * 33)


def channel_block(channels: int) -> int:
    """Channels per tile for channels-last kernels (a power of two, at most MIN_TILE and 256)."""
    return min(next_pow2(channels), MIN_TILE, 256)


# Programs per SM that a reduction kernel (channel_stats, the backward) aims for in all: several
# waves of small, equal programs keep the last wave short whatever occupancy the chosen config
# gets. NASPRUNE_TRITON_PROGRAMS_PER_SM overrides it (for benchmarking).
PROGRAMS_PER_SM = int(os.environ.get("NASPRUNE_TRITON_PROGRAMS_PER_SM", "16"))
MAX_PARTIALS = 4096  # programs per group: the second stage adds them in one vector


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction kernel should launch in all: PROGRAMS_PER_SM per SM on a GPU,
    a handful under the interpreter (about 1 ms per program instance there)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_SM * _sm_count(index)


def split_programs(groups: int, elements_per_group: int, device: torch.device) -> int:
    """Programs per group (channel or channel block) for a two-stage reduction: enough to fill
    the device, never more than there are MAX_TILE chunks of work in a group."""
    want = triton.cdiv(target_programs(device), max(groups, 1))
    return max(1, min(want, triton.cdiv(elements_per_group, MAX_TILE), MAX_PARTIALS))


def reduce_block(programs: int) -> tuple[int, int]:
    """(vector width, num_warps) of the second-stage reductions over the per-group partials."""
    block = min(max(next_pow2(programs), 16), MAX_PARTIALS)
    return block, 8 if block >= 2048 else 4
