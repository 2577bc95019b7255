"""TAS search step (weight update + architecture update) on a ResNet: nasprune's TAS
against a straightforward eager implementation of the same layer math as TAS's official code
(zero-padded input, full-width conv, prefix slices, per-candidate BN, adaptive_avg_pool3d CWI,
weighted sum; top-2 sampling by torch.multinomial on the host, per layer per step; arg-max FLOPs
read on the host), sharing the same weights, optimisers and data, in one process.

    python benchmarks/bench_tas.py                      # CPU: ResNet-56, batch 64
    python benchmarks/bench_tas.py --device cuda        # GPU: ResNet-56, batch 256
    python benchmarks/bench_tas.py --model resnet50 --batch 16   # torchvision ResNet-50 at 32x32

Appends rows to benchmarks/results/tas.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from nasprune import models  # noqa: E402
from nasprune.search import TAS, cost_loss  # noqa: E402
from nasprune.search.tas_net import add_unequal, cwi_reference  # noqa: E402


# ---------------------------------------------------------------- the eager reference
def eager_conv(layer, x, index, w):
    if layer.avg:
        x = F.avg_pool2d(x, layer.pool_stride)
    cin = layer.conv.in_channels
    if x.size(1) < cin:
        x = torch.cat([x, x.new_zeros(x.size(0), cin - x.size(1), x.size(2), x.size(3))], 1)
    o = layer.conv(x)
    widths = [layer.choices[i] for i in index]
    frags = [o[:, :c] for c in widths]
    if layer.bns is not None:
        frags = [layer.bns[i](f) for i, f in zip(index, frags)]
    c_max = max(widths)
    out = cwi_reference(frags[0], c_max) * w[0] + cwi_reference(frags[1], c_max) * w[1]
    return F.relu(out) if layer.relu else out


def eager_sample(net, tau):
    index, weights = [], []
    for row, mask in zip(net.width_logits, net.width_mask):
        logits = row[mask]
        new = (logits.log_softmax(0) + -torch.empty_like(logits).exponential_().log()) / tau
        with torch.no_grad():
            probs = new.softmax(0).cpu()                       # host copy, per layer
            idx = torch.multinomial(probs + 1e-7, 2, False)
        index.append(idx.tolist())
        weights.append(new[idx.to(new.device)].softmax(0))
    logp = net.depth_logits.masked_fill(~net.depth_mask, -1e9).log_softmax(1)
    depth = ((logp - torch.empty_like(logp).exponential_().log()) / tau).masked_fill(~net.depth_mask, -1e9).softmax(1)
    return index, weights, depth


def eager_forward(net, x, tau):
    index, w, q = eager_sample(net, tau)
    x = eager_conv(net.stem, x, index[0], w[0])
    if net.spec.stem_pool:
        x = F.max_pool2d(x, 3, 2, 1)
    for s, blocks in enumerate(net.stage_blocks):
        ends = []
        for a, i in enumerate(blocks):
            blk, rows = net.blocks[i], net.block_rows[i]
            out = x
            for conv, r in zip(blk.convs, rows):
                out = eager_conv(conv, out, index[r], w[r])
            res = x if blk.shortcut is None else eager_conv(blk.shortcut, x, index[rows[-1]], w[rows[-1]])
            x = F.relu(add_unequal(res, out))
            if a + 1 in net.depth_choices[s]:
                ends.append(x)
        c_max = max(t.size(1) for t in ends)
        x = sum(cwi_reference(t, c_max) * q[s, k] for k, t in enumerate(ends))
    f = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(f, net.fc.weight[:, :f.size(1)], net.fc.bias)


def eager_step(s: TAS, batch_w, batch_a):
    net = s.model
    net.train()
    x, y = batch_w
    loss = F.cross_entropy(eager_forward(net, x, s.tau), y)
    s.w_opt.zero_grad(set_to_none=True); s.a_opt.zero_grad(set_to_none=True)
    loss.backward()
    s.w_opt.step()
    xa, ya = batch_a
    logits = eager_forward(net, xa, s.tau)
    current = float(net.argmax_cost())                          # host read, as get_flop('genotype')
    l_cost = cost_loss(net.expected_cost() / 1e6, torch.tensor(current), s.target, s.tolerance)
    loss_a = F.cross_entropy(logits, ya) + s.cost_weight * l_cost
    s.w_opt.zero_grad(set_to_none=True); s.a_opt.zero_grad(set_to_none=True)
    loss_a.backward()
    s.a_opt.step()


def build_model(name):
    if hasattr(models, f"cifar_{name}"):
        return getattr(models, f"cifar_{name}")()
    import torchvision
    return getattr(torchvision.models, name)(num_classes=10)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=str(_common.default_device()))
    p.add_argument("--model", default="resnet56",
                   help="a CIFAR ResNet (resnet20 ... resnet110) or a torchvision ResNet (resnet18, resnet50, ...)")
    p.add_argument("--size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--batch", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    p.add_argument("--reps", type=int, default=3, help="steps per variant per round (4 rounds)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    s = TAS(build_model(args.model), 0.5, input_size=args.size, device=device, seed=0)
    s.begin_epoch(0, 10, 100)
    g = torch.Generator().manual_seed(0)
    bw = (torch.randn(batch, 3, args.size, args.size, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
    ba = (torch.randn(batch, 3, args.size, args.size, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
    # Both at the same state of the logits (the start of a search, widest candidates likely).
    state = {k: v.clone() for k, v in s.model.state_dict().items()}

    def ours():
        s.model.load_state_dict(state)
        s.step(bw, ba)

    def eager():
        s.model.load_state_dict(state)
        eager_step(s, bw, ba)

    rows = []
    times = _common.compare_ms({"eager": eager, "nasprune": ours}, device, rounds=4, reps=args.reps,
                               warmup=1)
    t_eager = times["eager"]
    for name, ms in times.items():
        rows.append({"bench": "tas_search_step", "impl": name, "model": args.model, "size": args.size, "batch": batch,
                     "median_ms": ms, "speedup_vs_eager": t_eager / ms})
    print(_common.table(rows, ["impl", "model", "batch", "median_ms", "speedup_vs_eager"]))
    if not args.no_record:
        print("recorded to", _common.record("tas", device, rows))


if __name__ == "__main__":
    main()
