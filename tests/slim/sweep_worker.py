"""Sweep worker: for each model name read from stdin, slim it to half of every prunable group
and print one JSON line of measured facts (the pytest side asserts on them)."""
from __future__ import annotations

import gc
import json
import sys
import time
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import zoo  # noqa: E402

import nasprune.flops as flops  # noqa: E402
import nasprune.graph as graph_mod  # noqa: E402
import nasprune.slim as slim  # noqa: E402
from nasprune.search.gated import GatedNetwork  # noqa: E402


def _widths(module):
    """Width attributes of the layer types the sweep checks: conv, linear, batch norm."""
    if isinstance(module, (torch.nn.modules.conv._ConvNd)):
        return {"in": module.in_channels, "out": module.out_channels}
    if isinstance(module, torch.nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return {"channel": module.num_features}
    return {}


def check(name: str) -> dict:
    t0 = time.perf_counter()
    model, x = zoo.build(name)
    facts = {"name": name, "params": sum(p.numel() for p in model.parameters())}
    t = time.perf_counter()
    graph = graph_mod.trace(model, x)
    facts["trace_s"] = time.perf_counter() - t
    keep = slim.uniform_keep(graph, 0.5)
    facts["groups"], facts["prunable"] = len(graph.groups), len(graph.prunable_groups)
    facts["pruned_groups"] = len(keep)
    def fingerprint(m):  # cheap to keep for a 600M-parameter model, unlike a copy
        return {k: (float(v.double().sum()), float(v.double().abs().sum())) for k, v in m.state_dict().items()}

    before = fingerprint(model)
    t = time.perf_counter()
    slimmed = slim.apply(model, graph, keep)
    facts["slim_s"] = time.perf_counter() - t
    facts["original_untouched"] = before == fingerprint(model)

    # every pruned layer dimension has the width the group members predict
    expected = zoo.expected_widths(graph, keep)
    mismatches = []
    for (module, role), (full, gone) in expected.items():
        got = _widths(slimmed.get_submodule(module)).get(role)
        if got is not None and got != full - gone:
            mismatches.append(f"{module}.{role}: {got} != {full - gone}")
    facts["width_mismatches"] = mismatches[:5]
    facts["dims_checked"] = len(expected)
    facts["dims_pruned"] = sum(1 for _, gone in expected.values() if gone)

    with torch.no_grad():
        out = model(x)
        out_slim = slimmed(x)
    facts["shapes_equal"] = [tuple(a.shape) for a in zoo.leaves(out)] == [tuple(b.shape) for b in zoo.leaves(out_slim)]
    facts["finite"] = all(bool(torch.isfinite(t).all()) for t in zoo.leaves(out_slim))
    if facts["params"] <= zoo.CONTRACT_MAX_PARAMS:
        masked = slim.mask(model, graph, keep)
        with torch.no_grad():
            facts["contract_err"] = zoo.max_rel_diff(masked(x), out_slim)
        del masked
    cost = flops.CostModel(graph)
    facts["macs"] = cost.total()
    facts["macs_slim_predicted"] = cost.exact(keep)
    facts["macs_slim_counted"] = flops.count(slimmed, x)
    del out, out_slim

    if name not in zoo.SEGMENTATION:  # the gated network's contract covers the classifiers
        try:
            small = facts["params"] <= zoo.CONTRACT_MAX_PARAMS
            facts["gated"] = gated_facts(model, x, ("train", "eval") if small else ("eval",), masked=small)
        except Exception as exc:  # noqa: BLE001 - reported to its own test, not the slimming one
            facts["gated"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    del model

    slimmed.train()
    loss = sum(t.float().sum() for t in zoo.leaves(slimmed(x)) if t.is_floating_point())
    loss.backward()
    grads = [p.grad for p in slimmed.parameters() if p.requires_grad]
    facts["train_loss_finite"] = bool(torch.isfinite(loss))
    facts["grads_present"] = sum(g is not None for g in grads) / max(1, len(grads))
    facts["grads_finite"] = all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
    facts["seconds"] = time.perf_counter() - t0
    return facts


def _run(model, x, seed=0):
    """Outputs and input gradient of ``model`` on ``x`` with the RNG at ``seed`` (dropout and
    stochastic depth draw the same masks in the model and its gated copy)."""
    x = x.clone().requires_grad_()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model(x)
    loss = sum(t.float().square().sum() for t in zoo.leaves(out) if t.is_floating_point())
    (grad,) = torch.autograd.grad(loss, x)  # the input's alone: no parameter gradients held
    return [t.detach() for t in zoo.leaves(out)], grad


def gated_facts(model, x, modes=("train", "eval"), masked: bool = True) -> dict:
    """The gated network's contract on one model (issue 12), in the model's own NCHW layout:
    all gates at one equal the model, 0/1 gates equal slim.mask / slim.apply and the cost model,
    continuous gates export exactly. Once with every site a stand-alone gate ("plain", exact to
    the last bit where the gate is 1) and once with conv-BN-act fused (the default, whose
    epilogue rounds differently from nn.BatchNorm2d in the last bit). Models over
    CONTRACT_MAX_PARAMS check the outputs in eval alone, against slim.apply but not slim.mask
    (a masked full-size copy would double the worker's memory)."""
    t = time.perf_counter()
    facts = {}
    for fuse in (False, True):
        tag = "fused" if fuse else "plain"
        gn = GatedNetwork(model, x, memory_format="contiguous", fuse=fuse)
        if fuse:
            facts.update(gates=gn.num_gates, groups=len(gn.groups),
                         ungated={str(g): why for g, why in gn.ungated.items()},
                         sites=sum(len(s) for s in gn.site_info.values()),
                         fused=sum(s.kind == "fused" for sites in gn.site_info.values() for s in sites))
        for mode in modes:
            model.train(mode == "train")
            gn.train(mode == "train")
            (ya, ga), (yb, gb) = _run(model, x), _run(gn, x)
            facts[f"{tag}_ones_{mode}_out"] = zoo.max_rel_diff(ya, yb)
            facts[f"{tag}_ones_{mode}_grad"] = zoo.max_rel_diff(ga, gb)
        model.eval()
        gn.eval()
        keep = {g: i for g, i in zoo.random_keep(gn.graph, 3).items() if g in gn.offsets}
        binary = gn.keep_vector(keep)
        gn.set_gates({g: binary[o:o + gn.sizes[g]] for g, o in gn.offsets.items()})
        slimmed = slim.apply(model, gn.graph, keep)
        if fuse:
            facts["binary_macs"] = float(gn.expected_macs())
            facts["binary_params"] = float(gn.expected_params())
            facts["exact_macs"] = flops.CostModel(gn.graph).exact(keep)
            facts["slim_macs"] = flops.count(slimmed, x)
            facts["slim_params"] = flops.count_params(slimmed)
        with torch.no_grad():
            gated_out = gn(x)
            facts[f"{tag}_binary_vs_slim"] = zoo.max_rel_diff(gated_out, slimmed(x))
            if masked:
                facts[f"{tag}_binary_vs_mask"] = zoo.max_rel_diff(gated_out, slim.mask(model, gn.graph, keep)(x))
        del slimmed
        g = torch.Generator().manual_seed(5)
        gn.set_gates({gi: 0.2 + 0.8 * torch.rand(gn.sizes[gi], generator=g) for gi in gn.offsets})
        exported = gn.export(keep={})
        with torch.no_grad():
            facts[f"{tag}_export_err"] = zoo.max_rel_diff(gn(x), exported(x))
        facts["export_class"] = type(exported).__name__ == type(model).__name__
        del exported
        del gn
    facts["seconds"] = time.perf_counter() - t
    return facts


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        try:
            facts = check(name)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            facts = {"name": name, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
        print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
