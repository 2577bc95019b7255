"""TAS width aggregation: nasprune's fused path against the eager composition a user writes.

Both compute, for K sampled candidate widths of a conv output z (N, C, H, W),
    y = relu(sum_j w_j CWI(BN_j(z[:, :c_j]), C_max)), zero-padded to C channels,
with per-candidate BatchNorm in training mode and w = softmax over the sampled logits / tau.

  eager:      prefix slices, F.batch_norm per candidate, adaptive_avg_pool3d (TAS's CWI),
              weighted sum, F.pad, relu; widths as host integers (TAS's own code).
  nasprune:   channel_stats once, the candidates' BN folded into packed (K, C) affines, one
              width_aggregate; widths stay on the device.
  torch.compile of the eager composition (unless --no-compile).

Times forward+backward (grads to z, the BN affines and the logits) and forward alone, then the
single ops with their achieved GB/s (bytes each must move at least once). Defaults: CPU
(64, 64, 8, 8) fp32, GPU (256, 64, 32, 32) bf16. Results go to results/width_aggregate.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from nasprune import ops  # noqa: E402

EPS = 1e-5


def eager_aggregate(z, gammas, betas, widths, weights):
    c, spatial = z.shape[1], tuple(z.shape[2:])
    cmax = max(widths)
    out = None
    for j, cj in enumerate(widths):
        frag = F.batch_norm(z[:, :cj], None, None, gammas[j], betas[j], training=True, eps=EPS)
        frag = F.adaptive_avg_pool3d(frag, (cmax,) + spatial)
        out = weights[j] * frag if out is None else out + weights[j] * frag
    return torch.relu(F.pad(out, (0, 0, 0, 0, 0, c - cmax)))


def fused_aggregate(z, gamma, beta, widths, weights):
    mean, var = ops.channel_stats(z)
    scale = gamma * torch.rsqrt(var + EPS)  # gamma is zero beyond each width
    shift = beta - mean * scale
    return ops.width_aggregate(z, scale, shift, widths, weights, "relu")


def cases(shape, dtype, device, widths, compile_: bool):
    n, c, h, w = shape
    k = len(widths)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    inside = (torch.arange(c)[None] < torch.tensor(widths)[:, None]).float()
    gamma = ((torch.rand(k, c, generator=gen) + 0.5) * inside).to(device).requires_grad_()
    beta = (torch.randn(k, c, generator=gen) * inside).to(device).requires_grad_()
    logits = torch.randn(k, generator=gen).to(device).requires_grad_()
    widths_dev = torch.tensor(widths, device=device)
    # eager: per-candidate BN parameters of their own widths, views of the same values
    gammas = [gamma[j, :cj] for j, cj in enumerate(widths)]
    betas = [beta[j, :cj] for j, cj in enumerate(widths)]
    leaves = [z, gamma, beta, logits]

    def weights():
        return torch.softmax(logits / 0.5, 0)

    variants = {
        "nasprune": lambda: fused_aggregate(z, gamma, beta, widths_dev, weights().to(z.dtype)),
        "eager": lambda: eager_aggregate(z, gammas, betas, widths, weights().to(z.dtype)),
    }
    if compile_:
        compiled = torch.compile(eager_aggregate)
        variants["torch.compile"] = lambda: compiled(z, gammas, betas, widths, weights().to(z.dtype))

    # The fused path computes what the eager composition computes.
    with torch.no_grad():
        y_fused, y_eager = variants["nasprune"](), variants["eager"]()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y_fused.float(), y_eager.float(), atol=tol, rtol=tol)

    def fwd_bwd(fn):
        def run():
            for t in leaves:
                t.grad = None
            fn().backward(dy)
        return run

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    rows = []
    for case, wrap in (("aggregation fwd+bwd", fwd_bwd), ("aggregation fwd", fwd)):
        times = _common.compare_ms({name: wrap(fn) for name, fn in variants.items()}, device)
        rows += [{"case": case, "impl": name, "ms": ms} for name, ms in times.items()]
    zd = z.detach()
    mean, var = ops.channel_stats(zd)
    scale = (gamma * torch.rsqrt(var + EPS)).detach()
    shift = (beta - mean * scale).detach()
    wd = weights().detach()
    elem = zd.element_size() * zd.numel()
    single = {
        "width_aggregate": (lambda: ops.width_aggregate(zd, scale, shift, widths_dev, wd, "relu"),
                            2 * elem),
        "width_aggregate_backward": (lambda: ops.width_aggregate_backward(
            dy, zd, scale, shift, widths_dev, wd, "relu"), 3 * elem),
    }
    for name, (fn, nbytes) in single.items():
        ms = _common.median_ms(fn, device)
        rows.append({"case": name, "impl": "nasprune", "ms": ms, "GB/s": nbytes / (ms * 1e-3) / 1e9})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=str(_common.default_device()))
    ap.add_argument("--shape", type=int, nargs=4, default=None, help="N C H W")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="the sampled candidate widths (default: 38 and 57 of 64, scaled to C)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="CUDA backends to time (default: every available one)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shape = tuple(args.shape or ((256, 64, 32, 32) if gpu else (64, 64, 8, 8)))
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    widths = args.widths or [max(1, shape[1] * 38 // 64), max(1, shape[1] * 57 // 64)]
    torch.manual_seed(0)
    rows = _common.backend_sweep(device, args.backends,
                                 lambda: cases(shape, dtype, device, widths, not args.no_compile))
    print(f"{_common.device_name(device)}; shape {shape} {dtype}; widths {widths}; "
          f"torch {torch.__version__}")
    print(_common.table(rows, ["case", "impl", "ms", "x eager", "x compile", "GB/s", "% copy bw"]))
    if not args.no_record:
        for r in rows:
            r.update(shape=list(shape), dtype=str(dtype).replace("torch.", ""), widths=widths)
        print("recorded in", _common.record("width_aggregate", device, rows))
    return rows


if __name__ == "__main__":
    main()
