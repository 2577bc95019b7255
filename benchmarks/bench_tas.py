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
class EagerBNs:
    """One nn.BatchNorm2d per width candidate of every searched conv, as TAS's code has them,
    copied from the supernet's packed tables; and the weight SGD over them and the convs."""

    def __init__(self, s: TAS):
        net = s.model
        self.bns = {}
        for layer in net.modules():
            if getattr(layer, "bn", None) is not None and hasattr(layer, "choices"):
                bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(c) for c in layer.choices).to(s.device)
                for j, bn in enumerate(bns):
                    bn.load_state_dict(layer.bn.candidate(j))
                self.bns[layer] = bns
        params = [p for n, p in net.named_parameters() if not n.endswith(("_logits", "bn.affine"))]
        params += [p for bns in self.bns.values() for p in bns.parameters()]
        g = s.w_opt.param_groups[0]
        self.opt = torch.optim.SGD(params, lr=g["lr"], momentum=g["momentum"], weight_decay=g["weight_decay"],
                                   nesterov=True)


def eager_conv(layer, x, index, w, bns):
    if layer.avg:
        x = F.avg_pool2d(x, layer.pool_stride)
    cin = layer.conv.in_channels
    if x.size(1) < cin:
        x = torch.cat([x, x.new_zeros(x.size(0), cin - x.size(1), x.size(2), x.size(3))], 1)
    o = layer.conv(x)
    widths = [layer.choices[i] for i in index]
    frags = [o[:, :c] for c in widths]
    if layer.bn is not None:
        frags = [bns.bns[layer][i](f) for i, f in zip(index, frags)]
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


def eager_forward(net, x, tau, bns):
    index, w, q = eager_sample(net, tau)
    x = eager_conv(net.stem, x, index[0], w[0], bns)
    if net.spec.stem_pool:
        x = F.max_pool2d(x, 3, 2, 1)
    for s, blocks in enumerate(net.stage_blocks):
        ends = []
        for a, i in enumerate(blocks):
            blk, rows = net.blocks[i], net.block_rows[i]
            out = x
            for conv, r in zip(blk.convs, rows):
                out = eager_conv(conv, out, index[r], w[r], bns)
            res = x if blk.shortcut is None else eager_conv(blk.shortcut, x, index[rows[-1]], w[rows[-1]], bns)
            x = F.relu(add_unequal(res, out))
            if a + 1 in net.depth_choices[s]:
                ends.append(x)
        c_max = max(t.size(1) for t in ends)
        x = sum(cwi_reference(t, c_max) * q[s, k] for k, t in enumerate(ends))
    f = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(f, net.fc.weight[:, :f.size(1)], net.fc.bias)


def eager_step(s: TAS, batch_w, batch_a, bns: EagerBNs):
    net = s.model
    net.train()
    x, y = batch_w
    loss = F.cross_entropy(eager_forward(net, x, s.tau, bns), y)
    bns.opt.zero_grad(set_to_none=True); s.a_opt.zero_grad(set_to_none=True)
    loss.backward()
    bns.opt.step()
    xa, ya = batch_a
    logits = eager_forward(net, xa, s.tau, bns)
    current = float(net.argmax_cost())                          # host read, as get_flop('genotype')
    l_cost = cost_loss(net.expected_cost() / 1e6, torch.tensor(current), s.target, s.tolerance)
    loss_a = F.cross_entropy(logits, ya) + s.cost_weight * l_cost
    bns.opt.zero_grad(set_to_none=True); s.a_opt.zero_grad(set_to_none=True)
    loss_a.backward()
    s.a_opt.step()


def build_model(name):
    if hasattr(models, f"cifar_{name}"):
        return getattr(models, f"cifar_{name}")()
    import torchvision
    return getattr(torchvision.models, name)(num_classes=10)


def main():
    p = _common.step_parser(__doc__)
    p.add_argument("--model", default="resnet56",
                   help="a CIFAR ResNet (resnet20 ... resnet110) or a torchvision ResNet (resnet18, resnet50, ...)")
    p.add_argument("--reps", type=int, default=3, help="steps per variant per round (4 rounds)")
    args = p.parse_args()
    device, batch = _common.step_setup(args)
    torch.manual_seed(0)
    # the eager reference implements TAS's channel-wise interpolation: time nasprune's the same way
    s = TAS(build_model(args.model), 0.5, input_size=args.size, align="cwi", device=device, seed=0)
    s.begin_epoch(0, 10, 100)
    g = torch.Generator().manual_seed(0)
    bw = (torch.randn(batch, 3, args.size, args.size, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
    ba = (torch.randn(batch, 3, args.size, args.size, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
    bns = EagerBNs(s)
    # Both from the same architecture logits (the start of a search, near-uniform). The weights
    # drift over the timed steps, which does not change the work of a step; restoring them would
    # time thousands of copies on a GPU.
    start = [p.detach().clone() for p in s.model.arch_parameters()]

    def reset():
        with torch.no_grad():
            for p, v in zip(s.model.arch_parameters(), start):
                p.copy_(v)

    def ours():
        reset()
        s.step(bw, ba)

    def eager():
        reset()
        eager_step(s, bw, ba, bns)

    variants = {"eager": eager, "nasprune": ours}
    ops = {name: _common.launches(fn, device) for name, fn in variants.items()}
    rows = []
    times = _common.compare_ms(variants, device, rounds=4, reps=args.reps, warmup=1)
    t_eager = times["eager"]
    for name, ms in times.items():
        rows.append({"bench": "tas_search_step", "impl": name, "model": args.model, "size": args.size, "batch": batch,
                     "median_ms": ms, "speedup_vs_eager": t_eager / ms, "launches": ops[name],
                     "launches_unit": "cuda kernels+copies" if device.type == "cuda" else "cpu work ops"})
    print(_common.table(rows, ["impl", "model", "batch", "median_ms", "speedup_vs_eager", "launches"]))
    if not args.no_record:
        print("recorded to", _common.record("tas", device, rows))


if __name__ == "__main__":
    main()
