"""Ahead-of-time compile of the width_aggregate Triton kernels for sm_80 and sm_90, no GPU needed.

Each variant (kernel x z dtype x target x autotune config x candidate count) goes through
triton.compile with an ASTSource, must yield PTX for the right target and a cubin, and the
bundled ptxas -v must report no register spills. The harness (worker subprocesses without
TRITON_INTERPRET, as in test_triton_compile.py) is in _triton_aot.py.
"""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from tests.kernels._triton_aot import compile_tests  # noqa: E402

MODULE = "width_aggregate"
CAPS = (80, 90)
# z dtype -> dtype of scale/shift (AMP keeps fp32 parameters; bf16 parameters also occur)
DTYPES = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16"}
HEAVY_CONFIG = (4096, 4)  # the most elements per thread among the GPU configs
# K = 2 (TAS) at the benchmark shape (256, 64, 32, 32): T = 4 slots, BI = 512, BC = 64; and K = 8
# (every width candidate of a layer), T = 16 slots.
GEOMETRIES = ({"T": 4, "KP": 2, "BI": 512, "BC": 64}, {"T": 16, "KP": 8, "BI": 128, "BC": 64})
MAIN_KERNELS = (
    ("_fwd_cf_kernel", ("T", "KP", "BI"), {"RELU": True}),
    ("_fwd_cl_kernel", ("T", "KP", "BC"), {"RELU": True}),
    ("_bwd_out_cf_kernel", ("T", "KP", "BI"), {"RELU": True}),
    ("_bwd_out_cl_kernel", ("T", "KP", "BC"), {"RELU": True}),
    ("_bwd_in_cf_kernel", ("T", "KP", "BI"), {}),
    ("_bwd_in_cl_kernel", ("T", "KP", "BC"), {}),
)
FINALIZE_KERNELS = (
    ("_bwd_sum_kernel", {"KP": 2, "S": 8, "BP": 1024}),
    ("_bwd_param_kernel", {"KP": 2, "BLOCK": 1024}),
)
# argument types by parameter name (see _triton_aot.py)
TYPES = dict(
    z_args=["z_ptr", "y_ptr", "dy_ptr", "du_ptr", "dz_ptr"],
    param_args=["scale_ptr", "shift_ptr", "dscale_ptr", "dshift_ptr"],
    arg_types={"widths_ptr": "*i64", "weights_ptr": "*fp32", "dweights_ptr": "*fp32",
               "part_ptr": "*fp32", "tot_ptr": "*fp32"},
    divisible_ints=["C", "inner"],  # multiples of 16 at the benchmark shape
)


def _variants() -> list[dict]:
    out = []

    def add(kernel, z, param, cap, meta, num_warps=4, divisible=False):
        out.append(dict(module=MODULE, kernel=kernel, z=z, param=param, cap=cap, meta=meta,
                        num_warps=num_warps, divisible=divisible))

    tile, warps = HEAVY_CONFIG
    for cap in CAPS:
        for zt, pt in DTYPES.items():
            for kernel, geo_keys, meta in MAIN_KERNELS:
                add(kernel, zt, pt, cap, {**meta, **{k: GEOMETRIES[0][k] for k in geo_keys},
                                          "TILE": tile}, warps, divisible=True)
            for kernel, meta in FINALIZE_KERNELS:
                add(kernel, zt, pt, cap, dict(meta))
    for kernel, geo_keys, meta in MAIN_KERNELS:
        # K = 8: four times the slots per tile
        add(kernel, "bf16", "fp32", 90, {**meta, **{k: GEOMETRIES[1][k] for k in geo_keys},
                                         "TILE": tile}, warps, divisible=True)
        # the other constexpr branch, odd sizes (no int divisibility), the smallest tile
        small = {**meta, **{k: GEOMETRIES[0][k] for k in geo_keys}, "TILE": 2048}
        if "RELU" in meta:
            small["RELU"] = False
        add(kernel, "bf16", "fp32", 90, small)
        # K = 1 (T = 2, KP = 1) with fp64 parameters
        geo = {"T": 2, "KP": 1, "BI": 1024, "BC": 64}
        add(kernel, "fp16", "fp64", 90, {**meta, **{k: geo[k] for k in geo_keys}, "TILE": 2048})
    add("_bwd_param_kernel", "fp32", "fp64", 80, {"KP": 8, "BLOCK": 16})
    return out


VARIANTS = _variants()

# every variant compiles without spills, and every kernel of the modules is among the variants
compiled, test_compiles_without_spills, test_every_kernel_is_covered = compile_tests(
    VARIANTS, TYPES, [MODULE], timeout=1800)
