"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, no GPU needed.

Each variant (kernel x z dtype x target x autotune config) goes through triton.compile with an
ASTSource, must yield PTX for the right target and a cubin, and the bundled ptxas -v must report
no register spills. The compiles run in worker subprocesses with TRITON_INTERPRET removed from
their environment: under the interpreter @triton.jit yields interpreted functions that cannot be
compiled, and this file may share a pytest process with test_triton_interpret.py.
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

# Not imported here: triton must first be imported by test_triton_interpret.py when it shares this
# process, after it has set TRITON_INTERPRET (triton decorates its own library at import).
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

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
Z_ARGS = {"z_ptr", "y_ptr", "dy_ptr", "dz_ptr"}
PARAM_ARGS = {"scale_ptr", "shift_ptr", "gate_ptr", "dscale_ptr", "dshift_ptr", "dgate_ptr"}
ARG_TYPES = {"src_ptr": "*i32", "index_ptr": "*i64", "part_ptr": "*fp32", "mean_ptr": "*fp32",
             "var_ptr": "*fp32", "sums_ptr": "*fp32", "stat_mean_ptr": "*fp32",
             "stat_invstd_ptr": "*fp32", "inv_count": "fp32"}
DIVISIBLE_INTS = {"C", "K", "C_out", "inner"}  # multiples of 16 at the benchmark shape


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


def _label(v: dict) -> str:
    meta = "-".join(f"{k}{int(x) if isinstance(x, bool) else x}"
                    for k, x in sorted(v["meta"].items()))
    return f"{v['kernel']}-{v['z']}-p{v['param']}-sm{v['cap']}-w{v['num_warps']}-{meta}" + (
        "-div16" if v["divisible"] else "") + ("-ints1" if v.get("ones") else "")


# ---------------------------------------------------------------------------------------------
# worker side (a subprocess without TRITON_INTERPRET)


def _signature(fn, v: dict) -> tuple[dict, dict, dict]:
    sig, attrs, constexprs = {}, {}, dict(v["meta"])
    for i, name in enumerate(fn.arg_names):
        if name in v["meta"]:
            sig[name] = "constexpr"
            continue
        if v.get("ones") and not name.endswith("_ptr") and name not in ARG_TYPES:
            sig[name] = "constexpr"
            constexprs[name] = 1
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

    kernel = getattr(importlib.import_module(f"nasprune.kernels.{v['module']}"), v["kernel"])
    fn = kernel
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
    # the flags triton's make_cubin passes (-lineinfo, --regAllocOptLevel=2), plus -v
    run = subprocess.run([get_ptxas(v["cap"]).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                          f"--gpu-name={arch}", path, "-o",
                          path + ".o"], capture_output=True, text=True)
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
        out, err = proc.communicate(timeout=900)
        lines = [l for l in out.splitlines() if l.startswith("RESULTS ")]
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
    """Every @triton.jit kernel in the kernel modules appears among the compiled variants
    (run in a subprocess so this process's interpreter mode does not matter)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = ("import json\n"
            "from triton.runtime.jit import JITFunction\n"
            "from nasprune.kernels import channel_stats, gate_epilogue\n"
            "names = []\n"
            "for m in (channel_stats, gate_epilogue):\n"
            "    for name, obj in vars(m).items():\n"
            "        fn = obj\n"
            "        while hasattr(fn, 'fn') and not isinstance(fn, JITFunction):\n"
            "            fn = fn.fn\n"
            "        if isinstance(fn, JITFunction) and name.endswith('_kernel'):\n"
            "            names.append(name)\n"
            "print(json.dumps(names))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert kernels == {v["kernel"] for v in VARIANTS}


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]))
