"""Ahead-of-time compile of every Triton kernel of channel_stats and gate_epilogue for sm_80 and
sm_90, no GPU needed.

Each variant (kernel x z dtype x target x autotune config) goes through triton.compile with an
ASTSource, must yield PTX for the right target and a cubin, and the bundled ptxas -v must report
no register spills. The harness (worker subprocesses without TRITON_INTERPRET, so that this file
may share a pytest process with test_triton_interpret.py) is in _triton_aot.py.
"""
from __future__ import annotations

import importlib.util

import pytest

# Not imported here: triton must first be imported by test_triton_interpret.py when it shares this
# process, after it has set TRITON_INTERPRET (triton decorates its own library at import).
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from tests.kernels._triton_aot import compile_tests  # noqa: E402

CAPS = (80, 90)
# z dtype -> dtype of scale/shift/gate (AMP keeps fp32 parameters; bf16 parameters also occur)
DTYPES = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16"}
HEAVY_CONFIGS = ((2048, 4), (4096, 8))  # the most elements per thread among the GPU configs
BENCH_INNER_BLOCK = 128  # inner_block(56 * 56)
BENCH_CHANNEL_BLOCK = 64  # channel_block(64)

# (module, kernel, the meta-parameters other than TILE)
MAIN_KERNELS = (
    ("channel_stats", "_stats_cf_kernel", {"BI": BENCH_INNER_BLOCK}),
    ("channel_stats", "_stats_cl_kernel", {"BC": BENCH_CHANNEL_BLOCK}),
    ("gate_epilogue", "_fwd_cf_kernel", {"BI": BENCH_INNER_BLOCK, "RELU": True, "HAS_INDEX": True}),
    ("gate_epilogue", "_fwd_cl_kernel", {"BC": BENCH_CHANNEL_BLOCK, "RELU": True,
                                         "HAS_INDEX": True}),
    ("gate_epilogue", "_bwd_cf_kernel", {"BI": BENCH_INNER_BLOCK, "RELU": True, "HAS_INDEX": True,
                                         "MODE": 0}),
    ("gate_epilogue", "_bwd_cl_kernel", {"BC": BENCH_CHANNEL_BLOCK, "RELU": True, "HAS_INDEX": True,
                                         "MODE": 0}),
)
BN_MODES = (1, 2)  # the two backward sweeps with batch statistics
FINALIZE_KERNELS = (
    ("channel_stats", "_stats_finalize_kernel", {"BP": 4096}),
    ("gate_epilogue", "_bwd_finalize_kernel", {"BP": 4096, "HAS_INDEX": True, "WRITE_SUMS": True}),
)
# argument types by parameter name (see _triton_aot.py)
TYPES = dict(
    z_args=["z_ptr", "y_ptr", "dy_ptr", "dz_ptr"],
    param_args=["scale_ptr", "shift_ptr", "gate_ptr", "dscale_ptr", "dshift_ptr", "dgate_ptr"],
    arg_types={"src_ptr": "*i32", "index_ptr": "*i64", "part_ptr": "*fp32", "mean_ptr": "*fp32",
               "var_ptr": "*fp32", "sums_ptr": "*fp32", "stat_mean_ptr": "*fp32",
               "stat_invstd_ptr": "*fp32", "inv_count": "fp32"},
    divisible_ints=["C", "K", "C_out", "inner"],  # multiples of 16 at the benchmark shape
)


def _variants() -> list[dict]:
    out = []
    for cap in CAPS:
        for zt, pt in DTYPES.items():
            for module, kernel, meta in MAIN_KERNELS:
                for tile, warps in HEAVY_CONFIGS:
                    out.append(dict(module=module, kernel=kernel, z=zt, param=pt, cap=cap,
                                    meta={**meta, "TILE": tile}, num_warps=warps, divisible=True))
            for module, kernel, meta in FINALIZE_KERNELS:  # reduce_block(4096) -> 8 warps
                out.append(dict(module=module, kernel=kernel, z=zt, param=pt, cap=cap, meta=meta,
                                num_warps=8, divisible=False))
            for module, kernel, meta in MAIN_KERNELS:
                for mode in BN_MODES if "MODE" in meta else ():
                    tile, warps = HEAVY_CONFIGS[-1]
                    out.append(dict(module=module, kernel=kernel, z=zt, param=pt, cap=cap,
                                    meta={**meta, "MODE": mode, "TILE": tile}, num_warps=warps,
                                    divisible=True))
    # the other constexpr branches, odd sizes (no int divisibility: scalar loads) and small tiles
    for module, kernel, meta in MAIN_KERNELS:
        small = {**meta, "TILE": 1024}
        if "RELU" in meta:
            small.update(RELU=False, HAS_INDEX=False)
        out.append(dict(module=module, kernel=kernel, z="bf16", param="fp32", cap=90, meta=small,
                        num_warps=4, divisible=False))
    # integer arguments equal to 1 (which the JIT may specialize into constants)
    for module, kernel, meta in MAIN_KERNELS:
        out.append(dict(module=module, kernel=kernel, z="fp16", param="fp16", cap=90,
                        meta={**meta, "TILE": 1024}, num_warps=4, divisible=False, ones=True))
    for module, kernel, meta in FINALIZE_KERNELS:
        out.append(dict(module=module, kernel=kernel, z="fp16", param="fp16", cap=90,
                        meta=dict(meta), num_warps=4, divisible=False, ones=True))
    out.append(dict(module="gate_epilogue", kernel="_bwd_finalize_kernel", z="fp32", param="fp64",
                    cap=90, meta={"BP": 16, "HAS_INDEX": False, "WRITE_SUMS": False}, num_warps=4,
                    divisible=False))
    return out


VARIANTS = _variants()

# every variant compiles without spills, and every kernel of the modules is among the variants
compiled, test_compiles_without_spills, test_every_kernel_is_covered = compile_tests(
    VARIANTS, TYPES, ["channel_stats", "gate_epilogue"], timeout=900)
