"""TAS searcher on the embedded digits (16x16, a 14-layer CIFAR ResNet): budget met, export
consistent, checkpoints resume exactly."""
import glob
import os

import pytest
import torch

from nasprune import flops
from nasprune.data import load_dataset, tas_split
from nasprune.models import CifarResNet
from nasprune.search import TAS, load_checkpoint
from tests.search._kill import Kill

SIZE = 16


@pytest.fixture(scope="module")
def splits():
    train, test = load_dataset(None, size=SIZE)
    return tas_split(train)


def _searcher(seed=0, target=0.5, **kw):
    torch.manual_seed(0)
    return TAS(CifarResNet(14), target, input_size=SIZE, device="cpu", seed=seed, **kw)


def test_tiny_search_meets_flops_target_and_export_matches_estimate(splits):
    w, a = splits
    # 4 short epochs (44 steps): a far larger Adam step than TAS's 1e-3 (600 epochs); at 1e-2 the
    # logits barely move and the arg-max is noise (docs/tas.md, Search health)
    s = _searcher(arch_lr=0.1)
    start = s.model.width_logits.detach().clone()
    final = s.search(w, a, epochs=4, batch_size=64)
    assert final == s.select("final")
    # A search this short swings around the budget (one stage's depth is 10-15 % of the MACs);
    # the in-budget rule exports the latest epoch-end arg-max in the cost loss's zero band.
    ratios = [h["flops_ratio"] for h in s.history]
    band = (0.5 - 0.05 * s.max_flops / s.base_flops, 0.5)
    assert any(band[0] <= r <= band[1] for r in ratios), ratios
    arch = s.select("in-budget")
    assert band[0] <= arch["flops"] / s.base_flops <= band[1]
    assert arch.get("epoch", len(s.history)) == max(h["epoch"] for h in s.history
                                                    if band[0] <= h["flops_ratio"] <= band[1])
    net = s.export(architecture=arch)
    assert flops.count(net, torch.zeros(1, 3, SIZE, SIZE)) == arch["flops"]
    assert isinstance(net, torch.nn.Module) and not any("logits" in n for n, _ in net.named_parameters())
    assert net(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)
    assert len(s.history) == 4 and s.history[-1]["tau"] < s.history[0]["tau"]
    # the architecture logits moved (Adam moves a logit by at most ~lr a step; 4 x 12 steps)
    assert (s.model.width_logits.detach() - start).abs().max() > 0.05


def test_widths_only_search_keeps_every_block_and_meets_the_budget(splits):
    w, a = splits
    s = _searcher(arch_lr=0.1, search_depth=False)
    assert s.model.depth_logits.shape == (3, 1) and s.config["search_depth"] is False
    # the largest network is the same full-depth one: the widths alone carry the budget
    assert s.max_flops == _searcher().max_flops
    s.search(w, a, epochs=4, batch_size=64)
    assert all(h["blocks"] == [2, 2, 2] for h in s.history)
    arch = s.select("in-budget")
    assert arch["blocks"] == [2, 2, 2]
    band = (0.5 - 0.05 * s.max_flops / s.base_flops, 0.5)
    assert band[0] <= arch["flops"] / s.base_flops <= band[1], [h["flops_ratio"] for h in s.history]
    net = s.export(architecture=arch)
    assert flops.count(net, torch.zeros(1, 3, SIZE, SIZE)) == arch["flops"]
    def k3(model):   # every block kept: as many 3x3 convs (1x1 projections may join where widths differ)
        return sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert k3(net) == k3(CifarResNet(14)) == 13


def test_exported_network_inherits_supernet_weights(splits):
    s = _searcher()
    net = s.export(init="inherit")
    i = s.model.probabilities()[0].argmax(1)[0].item()
    c = net.stem.conv.out_channels
    torch.testing.assert_close(net.stem.conv.weight, s.model.stem.conv.weight[:c])
    torch.testing.assert_close(net.stem.bn.weight, s.model.stem.bn.candidate(i)["weight"])
    fresh = s.export(init="random")
    assert not torch.equal(fresh.stem.conv.weight, net.stem.conv.weight)


def test_resume_after_kill_mid_epoch_reaches_the_same_architecture(splits, tmp_path):
    w, a = splits
    full = _searcher(seed=3)
    arch_full = full.search(w, a, epochs=2, batch_size=128, checkpoint=tmp_path / "full.safetensors")

    ckpt = tmp_path / "run.safetensors"
    first = _searcher(seed=3)
    with pytest.raises(KeyboardInterrupt):
        first.search(w, a, epochs=2, batch_size=128, checkpoint=ckpt, checkpoint_every=2, callbacks=[Kill(9)])
    state = load_checkpoint(ckpt)
    steps_per_epoch = len(w) // 128
    assert state["searcher"]["global_step"] == 8 and state["epoch"] == 8 // steps_per_epoch  # mid-epoch
    assert ckpt.is_file() and not glob.glob(os.path.join(tmp_path, ".nasprune-*.tmp"))  # no temp file left

    second = _searcher(seed=3)
    arch_resumed = second.search(w, a, epochs=2, batch_size=128, checkpoint=ckpt, resume=True)
    assert arch_resumed["widths"] == arch_full["widths"] and arch_resumed["blocks"] == arch_full["blocks"]
    torch.testing.assert_close(second.model.width_logits, full.model.width_logits, rtol=0, atol=0)
    torch.testing.assert_close(second.model.stem.conv.weight, full.model.stem.conv.weight, rtol=0, atol=0)
    assert [h["loss"] for h in second.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-12)
    assert second.in_band == full.in_band and second.select() == full.select()   # the band's record resumes too


def test_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        TAS(CifarResNet(14), 1.5, device="cpu")
    with pytest.raises(TypeError, match="TAS searches ResNets"):
        TAS(torch.nn.Linear(3, 3), 0.5, device="cpu")


def _logits_of(s, widths):
    """Width logits whose arg-max is ``widths``."""
    logits = torch.full_like(s.model.width_logits, -5.0)
    for row, (conv, w) in enumerate(zip(s.model.convs, widths)):
        logits[row, conv.choices.index(w)] = 5.0
    return logits


def test_select_in_budget_takes_latest_arch_in_band_and_export_builds_it():
    s = _searcher()
    g = torch.Generator().manual_seed(3)
    archs = []
    for _ in range(3):       # three epoch-end arg-max architectures
        with torch.no_grad():
            s.model.width_logits.copy_(torch.randn(s.model.width_logits.shape, generator=g))
        archs.append(s.architecture())
    s.history = [{"epoch": e + 1, "widths": a["widths"], "blocks": a["blocks"], "flops": a["flops"]}
                 for e, a in enumerate(archs[:2])]
    final = archs[2]
    assert len({a["flops"] for a in archs}) == 3
    s.target, s.tolerance = archs[0]["flops"] + 1.0, 2.0     # only epoch 1 lies in the band
    chosen = s.select()      # no band check recorded (a checkpoint of an earlier nasprune): the rows
    assert chosen["widths"] == archs[0]["widths"] and chosen["epoch"] == 1 and chosen["step"] is None
    # the checks between epoch ends: the latest arg-max seen in the band, with its step and epoch
    s.epoch = 2
    for step, a in ((40, archs[1]), (50, archs[0]), (60, archs[1])):
        with torch.no_grad():
            s.model.width_logits.copy_(_logits_of(s, a["widths"]))
        s._check_band(step)
    assert s.in_band["step"] == 50 and s.in_band["epoch"] == 2 and s.in_band["widths"] == archs[0]["widths"]
    with torch.no_grad():
        s.model.width_logits.copy_(_logits_of(s, final["widths"]))
    mid = s.select()
    assert mid["widths"] == archs[0]["widths"] and (mid["step"], mid["epoch"]) == (50, 2)
    assert mid["macs"] == chosen["macs"] == archs[0]["flops"]
    assert s.select("final")["widths"] == final["widths"]
    s.target = final["flops"]                                # the final one in band: it wins
    assert s.select()["widths"] == final["widths"]
    s.target, s.tolerance = 1.0, 0.5                         # none in band: the final one
    assert s.select()["widths"] == final["widths"]
    with pytest.raises(ValueError, match="rule must be one of"):
        s.select("best")
    net = s.export(architecture=chosen)
    assert flops.count(net, torch.zeros(1, 3, SIZE, SIZE)) == chosen["flops"]
    i = s.model.stem.choices.index(chosen["widths"][0])
    torch.testing.assert_close(net.stem.bn.running_var, s.model.stem.bn.candidate(i)["running_var"])
    assert net.stem.conv.out_channels == chosen["widths"][0]
