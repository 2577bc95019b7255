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
    del out, out_slim, model

    slimmed.train()
    loss = sum(t.float().sum() for t in zoo.leaves(slimmed(x)) if t.is_floating_point())
    loss.backward()
    grads = [p.grad for p in slimmed.parameters() if p.requires_grad]
    facts["train_loss_finite"] = bool(torch.isfinite(loss))
    facts["grads_present"] = sum(g is not None for g in grads) / max(1, len(grads))
    facts["grads_finite"] = all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
    facts["seconds"] = time.perf_counter() - t0
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
