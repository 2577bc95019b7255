"""Ahead-of-time compile of the width_aggregate Triton kernels for sm_80 and sm_90, no GPU needed.

Each variant (kernel x z dtype x target x autotune config x candidate count) goes through
triton.compile with an ASTSource, must yield PTX for the right target and a cubin, and the
bundled ptxas -v must report no register spills. The compiles run in worker subprocesses without
TRITON_INTERPRET (interpreted functions cannot be compiled, and this file may share a pytest
process with the interpreter tests). Same harness as test_triton_compile.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

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
Z_ARGS = {"z_ptr", "y_ptr", "dy_ptr", "du_ptr", "dz_ptr"}
PARAM_ARGS = {"scale_ptr", "shift_ptr", "dscale_ptr", "dshift_ptr"}
ARG_TYPES = {"widths_ptr": "*i64", "weights_ptr": "*fp32", "dweights_ptr": "*fp32",
             "part_ptr": "*fp32", "tot_ptr": "*fp32"}
DIVISIBLE_INTS = {"C", "inner"}  # multiples of 16 at the benchmark shape


def _variants() -> list[dict]:
    out = []

    def add(kernel, z, param, cap, meta, num_warps=4, divisible=False):
        out.append(dict(kernel=kernel, z=z, param=param, cap=cap, meta=meta, num_warps=num_warps,
                        divisible=divisible))

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


def _label(v: dict) -> str:
    meta = "-".join(f"{k}{int(x) if isinstance(x, bool) else x}" for k, x in sorted(v["meta"].items()))
    return f"{v['kernel']}-{v['z']}-p{v['param']}-sm{v['cap']}-w{v['num_warps']}-{meta}" + (
        "-div16" if v["divisible"] else "")


# ---------------------------------------------------------------------------------------------
# worker side (a subprocess without TRITON_INTERPRET)


def _signature(fn, v: dict) -> tuple[dict, dict, dict]:
    sig, attrs, constexprs = {}, {}, dict(v["meta"])
    for i, name in enumerate(fn.arg_names):
        if name in v["meta"]:
            sig[name] = "constexpr"
            continue
        if name in Z_ARGS:
            sig[name] = "*" + v["z"]
        elif name in PARAM_ARGS:
            sig[name] = "*" + v["param"]
        elif name in ARG_TYPES:
            sig[name] = ARG_TYPES[name]
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or (v["divisible"] and name in DIVISIBLE_INTS):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, constexprs


def _compile_one(v: dict, workdir: str) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"nasprune.kernels.{MODULE}"), v["kernel"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # an Autotuner wraps it
        fn = fn.fn
    sig, attrs, constexprs = _signature(fn, v)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", v["cap"], 32),
                                  options={"num_warps": v["num_warps"]})
    except Exception as err:  # reported, asserted on the pytest side
        return {"error": f"{type(err).__name__}: {err}"}
    ptx = compiled.asm.get("ptx", "")
    cubin = compiled.asm.get("cubin", b"")
    arch = "sm_90a" if v["cap"] == 90 else f"sm_{v['cap']}"
    path = os.path.join(workdir, f"{abs(hash(_label(v)))}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    run = subprocess.run([get_ptxas(v["cap"]).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                          f"--gpu-name={arch}", path, "-o", path + ".o"],
                         capture_output=True, text=True)
    log = run.stdout + run.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    regs = re.findall(r"Used (\d+) registers", log)
    return {"ptx_target": (re.findall(r"^\.target\s+(\S+)", ptx, re.M) or [""])[0],
            "cubin_bytes": len(cubin), "ptxas_rc": run.returncode, "ptxas_log": log[-2000:],
            "spill_bytes": sum(spills) if spills else None,
            "registers": int(regs[0]) if regs else None}


def _worker(shard: int, shards: int) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for i, v in enumerate(VARIANTS):
            if i % shards == shard:
                results[_label(v)] = _compile_one(v, workdir)
    print("RESULTS " + json.dumps(results))


# ---------------------------------------------------------------------------------------------
# pytest side


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(i),
                               str(shards)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(shards)]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
        assert proc.returncode == 0 and lines, f"compile worker failed:\n{err[-4000:]}"
        results.update(json.loads(lines[-1][len("RESULTS "):]))
    return results


@pytest.mark.parametrize("variant", VARIANTS, ids=_label)
def test_compiles_without_spills(compiled, variant):
    r = compiled[_label(variant)]
    assert "error" not in r, r.get("error")
    want = "sm_90a" if variant["cap"] == 90 else f"sm_{variant['cap']}"
    assert r["ptx_target"] == want
    assert r["cubin_bytes"] > 0
    assert r["ptxas_rc"] == 0, r["ptxas_log"]
    assert r["spill_bytes"] == 0, r["ptxas_log"]
    assert r["registers"] is not None and r["registers"] <= 255, r["ptxas_log"]


def test_every_kernel_is_covered():
    """Every @triton.jit kernel of the module appears among the compiled variants (checked in a
    subprocess so this process's interpreter mode does not matter)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = ("import json, triton\n"
            f"from nasprune.kernels import {MODULE} as m\n"
            "names = []\n"
            "for name, obj in vars(m).items():\n"
            "    fn = obj\n"
            "    while hasattr(fn, 'fn') and not isinstance(fn, triton.runtime.jit.JITFunction):\n"
            "        fn = fn.fn\n"
            "    if isinstance(fn, triton.runtime.jit.JITFunction) and name.endswith('_kernel'):\n"
            "        names.append(name)\n"
            "print(json.dumps(names))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert kernels == {v["kernel"] for v in VARIANTS}


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]))
