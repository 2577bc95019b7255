"""Gated conv-BN-activation epilogue: nasprune's fused ops against the eager PyTorch composition of
the same math (BatchNorm in training mode, ReLU, gate multiply, and their backward) and against
torch.compile of that composition, all in one process. Also times the whole GatedConvBNAct2d
training step (forward + backward) against conv -> BN -> ReLU -> gate in eager and compiled form.

    python benchmarks/bench_gate_epilogue.py                       # CPU: (32, 64, 32, 32) fp32
    python benchmarks/bench_gate_epilogue.py --device cuda         # GPU: (256, 64, 56, 56) bf16

Appends every row to benchmarks/results/gate_epilogue.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import nasprune  # noqa: E402
from nasprune import ops  # noqa: E402
from nasprune.nn import GatedConvBNAct2d  # noqa: E402


def eager_epilogue(z, weight, bias, gate, running_mean, running_var):
    y = F.batch_norm(z, running_mean, running_var, weight, bias, training=True, momentum=0.1, eps=1e-5)
    return gate.view(1, -1, 1, 1) * torch.relu(y)


def fused_epilogue(z, weight, bias, gate, running_mean, running_var):
    # As GatedConvBNAct2d runs it: statistics without autograd, the backward differentiates
    # through them itself (batch-statistics mode), running statistics updated like nn.BatchNorm2d.
    with torch.no_grad():
        mean, var = ops.channel_stats(z)
        n = z.numel() // z.shape[1]
        running_mean.lerp_(mean, 0.1)
        running_var.lerp_(var * (n / (n - 1)), 0.1)
        invstd = torch.rsqrt(var + 1e-5)
    scale = weight * invstd
    return ops.gate_epilogue(z, scale, bias - mean * scale, gate, "relu", None, mean, invstd)


class EagerLayer(nn.Module):
    """What a user writes without nasprune: conv -> BN -> ReLU -> gate."""

    def __init__(self, layer: GatedConvBNAct2d):
        super().__init__()
        self.conv, self.bn = layer.conv, layer.bn
        self.gate = nn.Parameter(layer.gate.detach().clone())

    def forward(self, x):
        return self.gate.view(1, -1, 1, 1) * torch.relu(self.bn(self.conv(x)))


def step(module, x, dy):
    def run():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)
    return run


def epilogue_cases(shape, dtype, device, compile_: bool):
    n, c, h, w = shape
    z = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device=device, dtype=dtype)
    params = [torch.rand(c, device=device) + 0.5, torch.randn(c, device=device),
              torch.rand(c, device=device) + 0.5]
    for p in params:
        p.requires_grad_()
    stats = [torch.zeros(c, device=device), torch.ones(c, device=device)]
    elem = z.element_size() * z.numel()

    def fwd_bwd(fn):
        def run():
            z.grad = None
            for p in params:
                p.grad = None
            fn(z, *params, *stats).backward(dy)
        return run

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(z, *params, *stats)
        return run

    variants = {"nasprune": fused_epilogue, "eager": eager_epilogue}
    if compile_:
        variants["torch.compile"] = torch.compile(eager_epilogue)
    rows = []
    for case, wrap in (("epilogue fwd+bwd", fwd_bwd), ("epilogue fwd", fwd)):
        times = _common.compare_ms({name: wrap(fn) for name, fn in variants.items()}, device)
        rows += [{"case": case, "impl": name, "ms": ms} for name, ms in times.items()]
    # Single ops, for achieved bandwidth: bytes each must move at least once.
    scale, shift, gate = (p.detach() for p in params)
    zd = z.detach()
    y = ops.gate_epilogue(zd, scale, shift, gate, "relu")
    single = {
        "channel_stats": (lambda: ops.channel_stats(zd), elem),
        "gate_epilogue": (lambda: ops.gate_epilogue(zd, scale, shift, gate, "relu"), 2 * elem),
        "gate_epilogue_backward": (lambda: ops.gate_epilogue_backward(dy, zd, scale, shift, gate, "relu"),
                                   3 * elem),
    }
    del y
    for name, (fn, nbytes) in single.items():
        ms = _common.median_ms(fn, device)
        rows.append({"case": name, "impl": "nasprune", "ms": ms, "GB/s": nbytes / (ms * 1e-3) / 1e9})
    return rows


def layer_cases(shape, dtype, device, compile_: bool, depthwise: bool):
    n, c, h, w = shape
    layer = GatedConvBNAct2d(c, c, 3, padding=1, groups=c if depthwise else 1).to(device, dtype)
    eager = EagerLayer(layer)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device=device, dtype=dtype)
    case = f"layer step {'depthwise ' if depthwise else ''}3x3"
    variants = {"nasprune": layer, "eager": eager}
    if compile_:
        variants["torch.compile"] = torch.compile(eager)
    times = _common.compare_ms({name: step(m, x, dy) for name, m in variants.items()}, device)
    return [{"case": case, "impl": name, "ms": ms} for name, ms in times.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=str(_common.default_device()))
    ap.add_argument("--shape", type=int, nargs=4, default=None, help="N C H W")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="CUDA backends to time (default: every available one)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shape = tuple(args.shape or ((256, 64, 56, 56) if gpu else (32, 64, 32, 32)))
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    torch.manual_seed(0)
    compile_ = not args.no_compile
    rows = _common.backend_sweep(device, args.backends, lambda: (
        epilogue_cases(shape, dtype, device, compile_)
        + layer_cases(shape, dtype, device, compile_, depthwise=True)
        + layer_cases(shape, dtype, device, compile_, depthwise=False)))
    print(f"{_common.device_name(device)}; shape {shape} {dtype}; torch {torch.__version__}")
    print(_common.table(rows, ["case", "impl", "ms", "x eager", "x compile", "GB/s", "% copy bw"]))
    if not args.no_record:
        for r in rows:
            r.update(shape=list(shape), dtype=str(dtype).replace("torch.", ""))
        print("recorded in", _common.record("gate_epilogue", device, rows))
    return rows


if __name__ == "__main__":
    main()
