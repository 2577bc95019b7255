"""FFP (issue 16): the budget holds exactly on digits (at or under the target, within one channel of
it), the filter importance equals autograd's |sum dy * y| per batch at the group gates, the bank's
teacher choice and the two-view CKT loss equal a plain PyTorch composition of methods-2.md 3.4,
search -> export -> eval -> save -> load on six models at CIFAR size, a killed search resumes
to the same subnetwork, and the slimmed scoring network scores as the masked full width."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nasprune
from nasprune import flops
from nasprune.data import DeviceLoader, ImageDataset, load_dataset
from nasprune.models import cifar_resnet20
from nasprune.search import FFP, GatedNetwork
from nasprune.search.ffp import MemoryBank, ckt_loss, kl_t, select_teachers
from nasprune.search.gated_searcher import gates_as
from nasprune.train import train
from tests.search._export_check import check_record_and_round_trip
from tests.search._kill import Kill
from tests.search.test_pas import _build, _rel   # the models of the end-to-end tests, the relative error

SIZE = 8
SMALL = dict(search_per_class=4, tune_per_class=16)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(None, size=SIZE)


def _removed_last(s):
    """Channels the last greedy step removed."""
    before, after = s.trail[-2]["keep"], s.trail[-1]["keep"]
    return ((before > 0.5) & (after < 0.5)).nonzero().flatten()


@pytest.fixture(scope="module")
def searched(digits):
    """Finished digits searches of a CIFAR ResNet-20, by target (each run once)."""
    runs = {}

    def run(target):
        if target not in runs:
            torch.manual_seed(0)
            model = cifar_resnet20(num_classes=10)
            s = FFP(model, target, input_size=SIZE, device="cpu", **SMALL)
            runs[target] = (model, s, s.search(digits[0], epochs=1, batch_size=64))
        return runs[target]
    return run


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_budget_holds_exactly_on_digits(searched, target):
    model, s, arch = searched(target)
    net = s.export()
    x = torch.zeros(1, 3, SIZE, SIZE)
    base, counted = flops.count(model, x), flops.count(net, x)
    assert s.gn.base_macs == base and arch["macs"] == counted and arch["params"] == flops.count_params(net)
    assert arch["selected_by"] == "search" and arch["steps"] == len(s.trail) - 1 >= 2
    assert counted <= target * base
    # within one channel step: one channel of the last step back and the MACs exceed the target
    final = s.trail[-1]["keep"].double()
    over = []
    for c in _removed_last(s).tolist():
        back = final.clone()
        back[c] = 1
        over.append(float(s.gn.expected_macs(back)) > target * base)
    assert over and any(over)
    # the search's MACs went down monotonically, one accepted subnetwork a step
    macs = [float(s.gn.expected_macs(t["keep"].double())) for t in s.trail]
    assert all(a > b for a, b in zip(macs, macs[1:]))


class _Tiny(nn.Module):
    """stem -> one residual block -> one plain conv -> pool -> fc: a residual stream of two
    producers (one shared gate) and two single-producer groups."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        s = F.relu(self.bn0(self.conv0(x)))
        s = F.relu(s + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(s))))))
        h = F.relu(self.bn3(self.conv3(s)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _dataset(n_per_class, classes, size, seed=0):
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (n_per_class * classes, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(classes, dtype=np.int64), n_per_class)
    return ImageDataset(images, labels, tuple(str(c) for c in range(classes)))


def test_importance_equals_autograd_sum_dy_y_per_batch():
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    data = _dataset(3, 4, 8)
    s = FFP(model, 0.5, input_size=8, device="cpu", search_per_class=3, tune_per_class=0)
    s.loaders(data, None, 5)                          # 12 search images: batches of 5, 5, 2
    gn = s.gn
    assert len(gn.groups) == 3 and gn.num_gates == 6 + 5 + 7
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(gn.num_gates, generator=gen) > 0.3).float()
    with torch.no_grad():
        gn.gate.copy_(mask)
    s.ensemble = torch.randn(12, 4, generator=gen)    # J = CE + CE to the ensemble
    got = s.importance()

    # plain PyTorch: the model itself, a 0/1 multiplier on every gated BatchNorm's output, BN on
    # batch statistics, the per-batch sum over (n, h, w) of dJ/dy * y of each gated output,
    # summed over the producers of a group (a shared gate), then |.|, accumulated over batches
    slots = {site.module: site.index for site in gn.site_info["train"]}
    assert set(slots) == {"bn0", "bn1", "bn2", "bn3"}
    ref_model = model
    ref_model.eval()
    for m in ref_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    outputs = {}

    def hook(name):
        def fn(module, inputs, out):
            y = out * mask[slots[name]].view(1, -1, 1, 1)
            y.retain_grad()
            outputs[name] = y
            return y
        return fn
    handles = [getattr(ref_model, n).register_forward_hook(hook(n)) for n in slots]
    expected = torch.zeros(gn.num_gates, dtype=torch.float64)
    interleaved = np.arange(12).reshape(4, 3).T.flatten()   # the search set: classes interleaved
    assert np.array_equal(s._loaders["search"].labels.numpy(), data.labels[interleaved])
    loader = DeviceLoader(data.subset(interleaved), 5, device="cpu")
    start = 0
    for x, y in loader:
        logits = ref_model(x)
        ens = s.ensemble[start:start + len(y)]
        start += len(y)
        j = F.cross_entropy(logits, y) - (F.softmax(ens, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
        j.backward()
        per_batch = torch.zeros(gn.num_gates, dtype=torch.float64)
        for name, out in outputs.items():
            per_batch.index_add_(0, slots[name], (out.grad * out).sum((0, 2, 3)).double())
        expected += per_batch.abs()
    for h in handles:
        h.remove()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7), (got, expected)
    assert bool((got[mask == 0] == 0).all()) and bool((got[mask == 1] > 0).all())


@pytest.mark.parametrize("name", ["tiny", "resnet20"])
def test_candidate_scores_equal_full_masked_forwards(name):
    """A fine step's candidates scored by resuming the current subnetwork's forward (from the
    importance pass's activations, from a fresh forward, or a mix) equal a full masked forward
    each (batch statistics), and the running statistics stay as they were; on a residual
    stream gated at several producers."""
    torch.manual_seed(0)
    model = _Tiny() if name == "tiny" else cifar_resnet20(num_classes=4)
    data = _dataset(5, 4, 8)
    s = FFP(model, 0.5, input_size=8, device="cpu", search_per_class=5, tune_per_class=0)
    s.loaders(data, None, 8)                          # 20 search images: batches of 8, 8, 4
    gn = s.gn
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        gn.gate.copy_((torch.rand(gn.num_gates, generator=gen) > 0.25).float())
        for m in gn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=gen)
    s.ensemble = torch.randn(20, 4, generator=gen)
    stats = {k: v.clone() for k, v in gn.named_buffers() if "running" in k or "num_batches" in k}
    cands = s.candidates(s.importance())
    values = [v for _, v in cands] + [s.mask().clone()]          # the current subnetwork too
    assert len(cands) >= 2 and len(s._caches) == 3 and all(c is not None for c in s._caches)
    full = [s.evaluate(v) for v in values]
    partial = list(s._caches[:1]) + [None, None]      # a cache for the first batch only
    for caches in (s._caches, None, partial):
        got = s.evaluate_candidates(values, caches)
        for (loss, logits), (want_loss, want_logits) in zip(got, full):
            assert loss == pytest.approx(want_loss, rel=1e-6, abs=1e-7)
            assert torch.allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    buffers = dict(gn.named_buffers())
    assert all(torch.equal(buffers[k], v) for k, v in stats.items())
    s.cache_bytes = 0                                 # nothing kept: every batch resumes a fresh forward
    s.importance()
    assert s._caches == [None] * 3


def test_slimmed_scoring_network_scores_as_the_masked_full_width():
    """Past ``slim_step`` of the MACs a step scores on a gated network of the slimmed subnetwork
    of a trail entry (the channels removed since then masked): its importance, mapped back to
    the full width, and its candidate scores (cached, resumed, the best) equal the full-width
    masked network's to fp32 rounding; a vector that keeps a channel the entry lacks is scored
    on the full width, the slimmed network's caches left unused. Seed 1: with seed 0 one
    pre-activation lies 4e-7 from a ReLU's kink (about 1e-6 of its terms), and the two networks'
    batch statistics, summed in width-dependent orders, differ by an ulp and put it on different
    sides; batch norm over a 32-value batch then spreads that element's gradient to every score
    before it (3 % at most). Seeds 1 to 5 agree to 1.1e-5."""
    torch.manual_seed(1)
    s = FFP(cifar_resnet20(num_classes=4), 0.5, input_size=8, device="cpu", search_per_class=5, tune_per_class=0,
            slim_step=0.15)
    s.loaders(_dataset(5, 4, 8), None, 8)             # 20 search images: batches of 8, 8, 4
    s.begin_epoch(0, 1, 0)
    while s._slim_entry_now() is None:
        s.step()
    s.step()                                          # one step past the entry: its removals masked
    net, slots, _ = s._scoring()
    entry = s._slim[0]
    kept = s.trail[entry]["keep"] > 0.5
    assert entry == len(s.trail) - 2 and net is not s.gn and 0 < net.num_gates == int(kept.sum()) < s.gn.num_gates
    assert torch.equal(slots.sort().values, kept.nonzero().flatten())
    assert 0 < int((net.gate < 0.5).sum()) == int(kept.sum()) - int((s.mask() > 0.5).sum())
    scores = s.importance()
    caches = s._caches
    assert caches[0].graph == id(net._resumable().gm) != id(s.gn._resumable().gm)
    values = [v for _, v in s.candidates(scores)]
    slimmed = [s.evaluate_candidates(values, caches), s.evaluate_candidates(values), s.best_candidate(values, caches)]
    s.slim_step = None                                # the full-width masked network
    masked = s.importance()
    assert torch.equal(masked == 0, scores == 0)
    assert torch.allclose(scores, masked, rtol=1e-3, atol=1e-6 * float(masked.max()))
    full = [s.evaluate(v) for v in values]
    for got in slimmed[:2]:
        for (loss, logits), (want_loss, want_logits) in zip(got, full):
            assert loss == pytest.approx(want_loss, rel=1e-5) and torch.allclose(logits, want_logits, atol=1e-4)
    k, loss, _ = slimmed[2]
    assert k == min(range(len(full)), key=lambda i: (full[i][0], i)) and loss == pytest.approx(full[k][0], rel=1e-5)
    s.slim_step = 0.15
    wider = s.trail[entry - 1]["keep"].clone()        # keeps channels the entry removed: the full width
    assert s._scoring([wider])[0] is s.gn
    (loss, logits), = s.evaluate_candidates([wider], caches)
    want_loss, want_logits = s.evaluate(wider)
    assert loss == pytest.approx(want_loss, rel=1e-6) and torch.allclose(logits, want_logits, atol=1e-5)


def test_slimmed_scoring_leaves_the_search_as_the_masked_one(digits, searched):
    """The digits search to 0.3 scored on slimmed networks (the default) and on the full-width
    masked network alone accept the same subnetworks, their J equal to fp32 rounding."""
    _, s, arch = searched(0.3)
    torch.manual_seed(0)
    masked = FFP(cifar_resnet20(num_classes=10), 0.3, input_size=SIZE, device="cpu", slim_step=None, **SMALL)
    arch_masked = masked.search(digits[0], epochs=1, batch_size=64)
    assert s._slim is not None and s._slim[1] is not None and masked._slim is None
    assert arch["keep"] == arch_masked["keep"] and len(s.trail) == len(masked.trail)
    assert all(torch.equal(a["keep"], b["keep"]) for a, b in zip(s.trail, masked.trail))
    assert [a["loss"] for a in s.trail] == pytest.approx([b["loss"] for b in masked.trail], rel=1e-6)


def test_a_slimmed_network_that_cannot_score_falls_back_to_full_width_said_and_recorded(digits, searched,
                                                                                      monkeypatch):
    """Where the slimmed scoring network's gates do not map onto the full network's, the step
    scores at full width: the same search (as the masked one), a RuntimeWarning once per
    slimmed entry, and the entries with the reason in the architecture (and its checkpoint)."""
    _, s, arch = searched(0.3)
    assert "full_width_scoring" not in arch

    def refuse(self, slimmed, kept):
        raise ValueError("positions merged (test)")
    monkeypatch.setattr(GatedNetwork, "slot_map", refuse)
    torch.manual_seed(0)
    f = FFP(cifar_resnet20(num_classes=10), 0.3, input_size=SIZE, device="cpu", **SMALL)
    with pytest.warns(RuntimeWarning, match="scored at full width") as caught:
        arch_f = f.search(digits[0], epochs=1, batch_size=64)
    entries = arch_f["full_width_scoring"]
    assert entries and all("positions merged (test)" in why for why in entries.values())
    assert len([w for w in caught if "scored at full width" in str(w.message)]) == len(entries)
    assert arch_f["keep"] == arch["keep"]
    assert [a["loss"] for a in f.trail] == pytest.approx([b["loss"] for b in s.trail], rel=1e-6)
    state = f.method_state()
    again = FFP(cifar_resnet20(num_classes=10), 0.3, input_size=SIZE, device="cpu", **SMALL)
    again.load_method_state(state)
    assert again.full_width_scoring == f.full_width_scoring


def test_untied_search_reaches_the_budget_scores_slimmed_and_exports_exactly(digits):
    """untie=True: every block's output a group of its own; the search ends at or under the
    target, scores on slimmed untied networks without falling back to full width, and the export
    (rescale off) equals the gated network at its keep."""
    import warnings
    torch.manual_seed(0)
    s = FFP(cifar_resnet20(num_classes=10), 0.5, input_size=SIZE, device="cpu", untie=True, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)         # no full-width fallback
        arch = s.search(digits[0], epochs=1, batch_size=64)
    assert "full_width_scoring" not in arch and s._slim is not None and s._slim[1] is not None
    x = torch.zeros(1, 3, SIZE, SIZE)
    net = s.export(rescale=False)
    assert arch["macs"] == flops.count(s.export(), x) <= 0.5 * arch["base_macs"]
    assert arch["tied_macs"] >= arch["macs"]
    probe = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    s.gn.eval()
    with torch.no_grad(), gates_as(s.gn, s.gn.keep_vector(s.keep()[0]).float()):
        assert _rel(s.gn(probe), net.eval()(probe)) <= 1e-5


def test_ckt_teacher_choice_and_two_view_loss_equal_the_equations():
    """methods-2.md 3.4: per view CE + T KL_T(M || view), M the mean of the bank entries whose
    batch-summed KL_T(best || entry) is below KL_T(best || mean of the views), averaged over views."""
    gen = torch.Generator().manual_seed(0)
    b, k, c, t = 6, 5, 7, 4.0
    best = torch.randn(b, c, generator=gen) * 3
    # entries at growing distances from the best one
    bank = torch.stack([best + 0.6 * i * torch.randn(b, c, generator=gen) for i in range(k)], 1)
    views = [(best + 1.0 * torch.randn(b, c, generator=gen)).requires_grad_() for _ in range(2)]
    y = torch.randint(0, c, (b,), generator=gen)

    def kl(p, q):      # T * sum softmax(p/T) (log softmax(p/T) - log softmax(q/T)), per sample
        ps = torch.softmax(p / t, 1)
        return t * (ps * (torch.log(ps) - torch.log(torch.softmax(q / t, 1)))).sum(1)
    student = (views[0] + views[1]).detach() / 2
    d_student = kl(bank[:, 0], student).sum()
    chosen = torch.tensor([bool(kl(bank[:, 0], bank[:, i]).sum() < d_student) or i == 0 for i in range(k)])
    assert 1 < int(chosen.sum()) < k                        # the test's bank makes a real choice
    m = bank[:, chosen].mean(1)
    reference = sum(F.cross_entropy(v, y) + kl(m, v).mean() for v in views) / 2
    ref_grads = torch.autograd.grad(reference, views)

    assert torch.allclose(kl_t(bank[:, 0], student, t), kl(bank[:, 0], student), atol=1e-6)
    teacher, got_chosen = select_teachers(bank, student, t)
    assert torch.equal(got_chosen, chosen) and torch.allclose(teacher, m)
    loss = ckt_loss(views, y, bank, t)
    grads = torch.autograd.grad(loss, views)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert all(torch.allclose(a, r, atol=1e-7) for a, r in zip(grads, ref_grads))
    # a student at the best entry: only the best entry teaches
    _, only = select_teachers(bank, bank[:, 0], t)
    assert only.tolist() == [True] + [False] * (k - 1)
    with pytest.raises(ValueError, match=r"bank logits \(B, K, classes\)"):
        select_teachers(bank[:, :, :3], student, t)


def test_bank_loader_views_and_indices_feed_train(tmp_path):
    data = _dataset(4, 3, 8)
    n = len(data)
    bank = MemoryBank(torch.randn(n, 2, 3), torch.tensor([0.5, 0.9]), torch.ones(2, 5))
    bank.save(tmp_path / "bank.safetensors")
    loaded = MemoryBank.load(tmp_path / "bank.safetensors")
    assert torch.equal(loaded.logits, bank.logits) and torch.equal(loaded.losses, bank.losses)
    loader = loaded.loader(data, 4, device="cpu")
    (v1, v2), y, index = next(iter(loader))
    assert v1.shape == v2.shape == (4, 3, 8, 8) and not torch.equal(v1, v2)   # two augmentations
    assert torch.equal(y, torch.as_tensor(data.labels)[index])
    plain = DeviceLoader(data, 4, device="cpu", augment=False)
    x, _ = next(iter(plain))
    assert x.shape == (4, 3, 8, 8)
    seen = []

    def loss_fn(model, batch):
        seen.append(batch[2].clone())
        return loaded.ckt_loss(4.0)(model, batch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 3))
    history = train(model, loader, epochs=2, lr=0.01, device="cpu", loss_fn=loss_fn)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert sorted(torch.cat(seen[:len(loader)]).tolist()) == list(range(n))   # each sample once an epoch
    with pytest.raises(ValueError, match="holds logits of 12 samples"):
        loaded.loader(data.subset(np.arange(5)), 4)
    with pytest.raises(ValueError, match="teacher .* or loss_fn"):
        train(model, loader, epochs=1, teacher=model, loss_fn=loss_fn, device="cpu")


E2E = ["resnet18", "mobilenet_v2", "efficientnet_b0", "vgg11_bn", "densenet121", "cifar_resnet20"]


@pytest.mark.parametrize("name", E2E)
def test_search_export_eval_save_load_at_cifar_size(name, tmp_path):
    model, (constructor, kwargs) = _build(name)
    data = _dataset(1, 10, 32)                         # a 10-image search set, no tuning
    target = 0.93
    s = FFP(model, target, input_size=32, device="cpu", search_per_class=1, tune_per_class=0)
    s.loaders(data, None, 10)
    s.begin_epoch(0, 1, 0)
    steps = 0
    while not s.finished() and steps < 2:
        metrics = s.step()
        s.global_step += 1
        steps += 1
    assert math.isfinite(float(metrics["loss"])) and metrics["candidates"] >= 1
    mask = s.mask()
    assert 0 < float(mask.mean()) < 1
    keep, how = s.keep()
    x = torch.zeros(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, 32, 32, generator=g)
    # without the rescale the export equals the gated network at the subnetwork's 0/1 gates
    plain = s.export(rescale=False)
    s.gn.eval()
    with torch.no_grad(), gates_as(s.gn, s.gn.keep_vector(keep).float()):
        reference = s.gn(probe)
        assert _rel(reference, plain(probe)) <= 1e-4
    assert flops.count(plain, x) == int(float(s.gn.expected_macs(mask)))
    # the default export: kept kernels rescaled to the unpruned kernels' Frobenius norms
    net = s.export()
    full = dict(model.named_modules())
    changed = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and m.weight.shape != full[n].weight.shape]
    assert changed
    for n in changed:                                  # VGG's first steps thin its classifier (linear)
        if isinstance(full[n], nn.Conv2d):
            assert float(net.get_submodule(n).weight.detach().norm()) == pytest.approx(float(full[n].weight.detach().norm()),
                                                                                rel=1e-5)
    arch = s.architecture()
    assert arch["selected_by"] == how == ("search" if s.finished() else "unfinished")
    if s.finished():
        assert arch["macs"] <= target * flops.count(model, x)
    with torch.no_grad():
        assert torch.isfinite(net(probe)).all()
    check_record_and_round_trip("ffp", model, net, arch, x, probe, tmp_path / "pruned.safetensors",
                                constructor, kwargs)


def test_search_killed_midway_resumes_to_the_same_subnetwork(digits, tmp_path):
    train_set, _ = digits
    kw = dict(input_size=SIZE, device="cpu", seed=5, **SMALL)

    def searcher():
        torch.manual_seed(0)
        return FFP(cifar_resnet20(num_classes=10), 0.75, **kw)
    full = searcher()
    arch_full = full.search(train_set, epochs=1, batch_size=32)
    tune = len(full._loaders["tune"])
    ckpt = tmp_path / "ffp.safetensors"
    with pytest.raises(KeyboardInterrupt):            # killed among the greedy steps
        searcher().search(train_set, epochs=1, batch_size=32, checkpoint=ckpt, checkpoint_every=3,
                          callbacks=[Kill(tune + 5)])
    torch.manual_seed(123)                             # the caller's RNG plays no part
    again = searcher()
    arch = again.search(train_set, epochs=1, batch_size=32, checkpoint=ckpt, resume=True)
    assert arch == arch_full and again.history == full.history
    assert torch.equal(again.mask(), full.mask()) and torch.equal(again.ensemble, full.ensemble)
    assert again._slim[0] == full._slim[0] is not None     # the slimmed scoring network replayed from the trail
    state, reference = again.gn.state_dict(), full.gn.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_memory_bank_entries_and_logits(digits, searched):
    train_set, _ = digits
    _, s, _ = searched(0.6)
    losses = [t["loss"] for t in s.trail]
    entries = s.bank_entries()
    assert len(set(entries)) == 5 and len(s.trail) - 1 not in entries
    for i, j in enumerate(entries):          # each the closest free entry to its loss level
        level = losses[-1] + (i + 1) / 5 * (losses[0] - losses[-1])
        free = [e for e in range(len(losses) - 1) if e not in entries[:i]]
        assert abs(losses[j] - level) == min(abs(losses[e] - level) for e in free)
    subset = train_set.subset(np.arange(50))
    bank = s.memory_bank(subset, batch_size=25)
    assert bank.logits.shape == (50, 5, 10) and bool((bank.losses[1:] >= bank.losses[:-1]).all())
    # entry 0's logits, in data order: the gated network at that entry's gates, BN on the batch
    # statistics of the bank's batches (a seeded random order of the data)
    first = bank.keeps[0]
    order = torch.randperm(50, generator=torch.Generator().manual_seed(s.seed))[:25]
    with s._batch_statistics(), gates_as(s.gn, first), torch.no_grad():
        x, _ = next(iter(DeviceLoader(subset.subset(order.numpy()), 25, device="cpu")))
        assert torch.allclose(bank.logits[order, 0], s.gn(x), atol=1e-5)
    with pytest.raises(TypeError, match="ImageDataset"):
        s.memory_bank(DeviceLoader(subset, 25, device="cpu"))


def test_arguments_are_checked():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="fraction of MACs kept"):
        FFP(cifar_resnet20(), 1.5, example_inputs=x)
    with pytest.raises(ValueError, match="search_per_class must be a positive int"):
        FFP(cifar_resnet20(), 0.5, example_inputs=x, search_per_class=0)
    with pytest.raises(ValueError, match="search_step"):
        FFP(cifar_resnet20(), 0.5, example_inputs=x, search_step=0)
    s = FFP(cifar_resnet20(), 0.5, example_inputs=x, device="cpu")
    with pytest.raises(TypeError, match="takes ImageDatasets"):
        s.loaders(torch.zeros(3), None, 4)
    with pytest.raises(RuntimeError, match="finished search"):
        s.bank_entries()


def test_command_line_search_bank_and_ckt_finetune(tmp_path):
    """`nasprune search --method ffp`: the search at or under the target, the memory bank in the
    run folder, CKT fine-tuning from it (also again through `nasprune finetune`), the model saved
    so that nasprune.load rebuilds it."""
    import json
    from nasprune import cli
    out = tmp_path / "run"
    rc = cli.main(["search", "--method", "ffp", "--model", "resnet20", "--data", "digits", "--image-size", str(SIZE),
                   "--flops-target", "0.6", "--epochs", "1", "--baseline-epochs", "1", "--finetune-epochs", "1",
                   "--batch-size", "128", "--search-per-class", "4", "--tune-per-class", "16", "--bank-size", "3",
                   "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    arch = json.loads((out / "architecture.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert arch["method"] == "ffp" and arch["selected_by"] == "search" and metrics["pruned"]["flops"] == arch["macs"]
    assert arch["macs"] <= 0.6 * metrics["baseline"]["flops"]
    bank = MemoryBank.load(out / "memory_bank.safetensors")
    assert bank.logits.shape == (1438, 3, 10) and len(metrics["pruned"]["history"]) == 1
    loaded = nasprune.load(out / "model.safetensors")
    assert flops.count(loaded, torch.zeros(1, 3, SIZE, SIZE)) == arch["macs"]
    assert cli.main(["finetune", "--run", str(out), "--epochs", "1", "--lr", "0.01", "--no-progress",
                     "--device", "cpu"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["pruned"]["history"]) == 1


def test_best_candidate_is_the_first_lowest_score_and_skips_candidates_that_cannot_win():
    """FFP.best_candidate (the search's step) picks what the full scores pick: the lowest J, the
    first of equals, with that candidate's J and logits; and it stops scoring a candidate once its
    weighted losses so far exceed a finished candidate's J (J is a mean of non-negative losses)."""
    torch.manual_seed(0)
    data = _dataset(5, 4, 8)
    s = FFP(cifar_resnet20(num_classes=4), 0.5, input_size=8, device="cpu", search_per_class=5, tune_per_class=0)
    s.loaders(data, None, 8)                          # 20 search images: batches of 8, 8, 4
    gn = s.gn
    opt = torch.optim.Adam(s.weights, lr=1e-2)        # fit the 20 images: J of the full network is small
    x_all, y_all = [torch.cat(t) for t in zip(*s._loaders["search"])]
    with s._frozen([gn.gate]):
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(gn(x_all), y_all).backward()
            opt.step()
    loss0, s.ensemble = s.evaluate(s.mask())
    cands = [v for _, v in s.candidates(s.importance())]
    bad = s.mask().clone()
    bad[torch.arange(gn.num_gates) % 4 != 0] = 0      # three channels of every four removed
    every = s.evaluate_candidates([bad] + cands, s._caches)
    first = min(range(len(every)), key=lambda k: (every[k][0], k))
    assert first > 0 and every[0][0] > 2.5 * every[first][0] > 0     # the bad one loses by far
    values = [bad] + cands + [cands[first - 1]]       # the winner again, last: the first of equals wins
    calls = []
    scoring = gn.forward_candidates

    def counted(x, candidates, **kwargs):
        calls.append([next(k for k, v in enumerate(values) if torch.equal(v, c[:-1] if len(c) > len(v) else c))
                      for c in candidates])
        return scoring(x, candidates=candidates, **kwargs)
    gn.forward_candidates = counted
    try:
        k, loss, logits = s.best_candidate(values, s._caches)
    finally:
        del gn.forward_candidates
    assert k == first and loss == every[first][0] and torch.equal(logits, every[first][1])
    scored = [k for ks in calls for k in ks]
    assert scored.count(0) == 1                       # the bad candidate: the first batch only
    assert scored.count(first) == 6                   # the winner and its copy (equal to it so far): every batch
    assert len(scored) < 3 * len(values)
