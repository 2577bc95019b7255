"""Ahead-of-time compile of the Triton filter_scores kernel for sm_80 and sm_90, no GPU needed.

Every variant (kind x weight dtype x target) goes through triton.compile with an ASTSource, must
give PTX for the right target and a cubin, load 16 bytes at a time on its aligned path, and the
bundled ptxas -v must report no spills. Compiles run in a subprocess without TRITON_INTERPRET
(under the interpreter @triton.jit gives functions that cannot be compiled).
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

CAPS = (80, 90)
DTYPES = {"fp32": 4, "fp16": 8, "bf16": 8}  # element type -> VEC (elements per 16 bytes)
KINDS = {"l1": 0, "l2": 1, "taylor": 2}
VARIANTS = [dict(cap=c, dtype=d, kind=k) for c in CAPS for d in DTYPES for k in KINDS]


def _label(v: dict) -> str:
    return f"{v['kind']}-{v['dtype']}-sm{v['cap']}"


def _compile_one(v: dict, workdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from nasprune.kernels import filter_scores as fs

    fn = fs._filter_scores_kernel
    sig = {"table_ptr": "*i64", "row_tensor_ptr": "*i32", "out_ptr": "*fp32", "T": "i32",
           "carrier_ptr": "*" + v["dtype"], "KIND": "constexpr", "BLOCK": "constexpr",
           "VEC": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={"KIND": KINDS[v["kind"]], "BLOCK": 1024, "VEC": DTYPES[v["dtype"]]})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", v["cap"], 32),
                                  options={"num_warps": fs.NUM_WARPS})
    except Exception as err:  # reported, asserted on the pytest side
        return {"error": f"{type(err).__name__}: {err}"}
    ptx = compiled.asm.get("ptx", "")
    arch = "sm_90a" if v["cap"] == 90 else f"sm_{v['cap']}"
    path = os.path.join(workdir, _label(v) + ".ptx")
    with open(path, "w") as f:
        f.write(ptx)
    run = subprocess.run([get_ptxas(v["cap"]).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                          f"--gpu-name={arch}", path, "-o", path + ".o"], capture_output=True,
                         text=True)
    log = run.stdout + run.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"ptx_target": (re.findall(r"^\.target\s+(\S+)", ptx, re.M) or [""])[0],
            "cubin_bytes": len(compiled.asm.get("cubin", b"")), "ptxas_rc": run.returncode,
            "ptxas_log": log[-2000:], "spill_bytes": sum(spills) if spills else None,
            "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))}


def _worker() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        print("RESULTS " + json.dumps({_label(v): _compile_one(v, workdir) for v in VARIANTS}))


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, f"compile worker failed:\n{run.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("variant", VARIANTS, ids=_label)
def test_compiles_without_spills(compiled, variant):
    r = compiled[_label(variant)]
    assert "error" not in r, r.get("error")
    assert r["ptx_target"] == ("sm_90a" if variant["cap"] == 90 else f"sm_{variant['cap']}")
    assert r["cubin_bytes"] > 0
    assert r["ptxas_rc"] == 0, r["ptxas_log"]
    assert r["spill_bytes"] == 0, r["ptxas_log"]
    assert r["vector_loads"] > 0  # the aligned path reads 16 bytes per load


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
