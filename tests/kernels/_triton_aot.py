"""Harness of the ahead-of-time Triton compile tests (test_triton_compile.py and
test_triton_compile_width_aggregate.py): no GPU needed.

Each variant (a dict: module, kernel, z and param dtypes, cap, meta, num_warps, divisible and
optionally ones) goes through triton.compile with an ASTSource for its target; the bundled ptxas -v
then compiles its PTX again and reports spills and registers. The compiles run in worker
subprocesses (this file run as a script) with TRITON_INTERPRET removed from their environment:
under the interpreter @triton.jit yields interpreted functions that cannot be compiled, and the
compile tests may share a pytest process with the interpreter tests. triton is not imported here
in the pytest process: when it shares the process with test_triton_interpret*.py, triton must
first be imported there, after TRITON_INTERPRET is set (triton decorates its own library at
import).

The argument types of a kernel come from its parameter names, as a dict of lists (JSON, for the
workers): z_args and param_args take the z and param dtype of the variant, arg_types gives fixed
types, divisible_ints the integers that are multiples of 16 in a `divisible` variant; every other
argument is an i32 (a constexpr equal to 1 in a variant with `ones`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest


def label(v: dict) -> str:
    """The test id and result key of a variant."""
    meta = "-".join(f"{k}{int(x) if isinstance(x, bool) else x}"
                    for k, x in sorted(v["meta"].items()))
    return f"{v['kernel']}-{v['z']}-p{v['param']}-sm{v['cap']}-w{v['num_warps']}-{meta}" + (
        "-div16" if v["divisible"] else "") + ("-ints1" if v.get("ones") else "")


def _worker_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def compile_variants(variants: list[dict], types: dict, timeout: float) -> dict:
    """{label: result} of compiling every variant, in up to 4 worker subprocesses."""
    shards = max(1, min(4, os.cpu_count() or 1))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = os.path.join(tmp, "job.json")
        with open(job, "w") as f:
            json.dump({"variants": {label(v): v for v in variants}, "types": types}, f)
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", job,
                                   str(i), str(shards)], env=_worker_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(shards)]
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
            assert proc.returncode == 0 and lines, f"compile worker failed:\n{err[-4000:]}"
            results.update(json.loads(lines[-1][len("RESULTS "):]))
    return results


def check_compiled(r: dict, cap: int) -> None:
    """PTX for the right target, a cubin, and ptxas -v without errors, spills or too many
    registers."""
    assert "error" not in r, r.get("error")
    want = "sm_90a" if cap == 90 else f"sm_{cap}"
    assert r["ptx_target"] == want
    assert r["cubin_bytes"] > 0
    assert r["ptxas_rc"] == 0, r["ptxas_log"]
    assert r["spill_bytes"] == 0, r["ptxas_log"]
    assert r["registers"] is not None and r["registers"] <= 255, r["ptxas_log"]


def jit_kernel_names(modules: list[str]) -> set[str]:
    """The names of the @triton.jit kernels (possibly autotuned) of nasprune.kernels.<module> for
    each module, found in a subprocess so that this process's interpreter mode does not matter."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--kernels", *modules],
                         env=_worker_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def compile_tests(variants: list[dict], types: dict, modules: list[str], timeout: float):
    """The fixture and tests of a compile test module, to bind there under these names:

        compiled, test_compiles_without_spills, test_every_kernel_is_covered = compile_tests(...)

    compiled (module scope) compiles every variant once; test_compiles_without_spills checks each
    variant (one test a variant, its label as id); test_every_kernel_is_covered checks that the
    variants name every @triton.jit kernel of nasprune.kernels.<module> for each of `modules`."""

    @pytest.fixture(scope="module")
    def compiled() -> dict:
        return compile_variants(variants, types, timeout)

    @pytest.mark.parametrize("variant", variants, ids=label)
    def test_compiles_without_spills(compiled, variant):
        check_compiled(compiled[label(variant)], variant["cap"])

    def test_every_kernel_is_covered():
        assert jit_kernel_names(modules) == {v["kernel"] for v in variants}

    return compiled, test_compiles_without_spills, test_every_kernel_is_covered


# ---------------------------------------------------------------------------------------------
# worker side (a subprocess without TRITON_INTERPRET)


def _signature(fn, v: dict, types: dict) -> tuple[dict, dict, dict]:
    sig, attrs, constexprs = {}, {}, dict(v["meta"])
    for i, name in enumerate(fn.arg_names):
        if name in v["meta"]:
            sig[name] = "constexpr"
            continue
        if v.get("ones") and not name.endswith("_ptr") and name not in types["arg_types"]:
            sig[name] = "constexpr"
            constexprs[name] = 1
            continue
        if name in types["z_args"]:
            sig[name] = "*" + v["z"]
        elif name in types["param_args"]:
            sig[name] = "*" + v["param"]
        elif name in types["arg_types"]:
            sig[name] = types["arg_types"][name]
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or (v["divisible"] and name in types["divisible_ints"]):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, constexprs


def _jit_function(obj):
    import triton

    while not isinstance(obj, triton.runtime.jit.JITFunction):  # an Autotuner wraps it
        obj = obj.fn
    return obj


def _compile_one(v: dict, types: dict, path: str) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = _jit_function(getattr(importlib.import_module(f"nasprune.kernels.{v['module']}"),
                               v["kernel"]))
    sig, attrs, constexprs = _signature(fn, v, types)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", v["cap"], 32),
                                  options={"num_warps": v["num_warps"]})
    except Exception as err:  # reported, asserted on the pytest side
        return {"error": f"{type(err).__name__}: {err}"}
    ptx = compiled.asm.get("ptx", "")
    cubin = compiled.asm.get("cubin", b"")
    arch = "sm_90a" if v["cap"] == 90 else f"sm_{v['cap']}"
    with open(path, "w") as f:
        f.write(ptx)
    # the flags triton's make_cubin passes (-lineinfo, --regAllocOptLevel=2), plus -v
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


def _worker(job: str, shard: int, shards: int) -> None:
    with open(job) as f:
        spec = json.load(f)
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for i, (name, v) in enumerate(spec["variants"].items()):
            if i % shards == shard:
                path = os.path.join(workdir, f"{i}.ptx")
                results[name] = _compile_one(v, spec["types"], path)
    print("RESULTS " + json.dumps(results))


def _kernels(modules: list[str]) -> None:
    import importlib

    from triton.runtime.jit import JITFunction

    names = []
    for module in modules:
        for name, obj in vars(importlib.import_module(f"nasprune.kernels.{module}")).items():
            fn = obj
            while hasattr(fn, "fn") and not isinstance(fn, JITFunction):
                fn = fn.fn
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                names.append(name)
    print(json.dumps(names))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--kernels":
        _kernels(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker JOB SHARD SHARDS | --kernels MODULE...")
