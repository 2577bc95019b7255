"""TAS search-space math: sampling, CWI, width aggregation, expected FLOPs, cost loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from nasprune import flops, ops
from nasprune.models import tas_resnet
from nasprune.search import cost_loss, temperature
from nasprune.search.tas_net import (CandidateBN, TASSupernet, aggregate_widths, cwi, cwi_reference, depth_choices,
                                     sample_widths, width_choices)


def test_width_and_depth_choices_match_tas_tables():
    assert width_choices(16) == [4, 6, 8, 9, 11, 12, 14, 16]
    assert width_choices(32) == [9, 12, 16, 19, 22, 25, 28, 32]
    assert width_choices(64) == [19, 25, 32, 38, 44, 51, 57, 64]
    assert depth_choices(2) == [1, 2] and depth_choices(3) == [1, 2, 3]
    assert depth_choices(9) == [1, 3, 5, 7, 9]
    assert depth_choices(18) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 18]


def test_sample_widths_is_the_ops_gumbel_topk_of_the_masked_logits():
    """One Gumbel top-k: TAS's width sampling draws exactly what nasprune.ops.gumbel_topk draws
    (whose frequencies tests/ops/test_gumbel.py checks) from the masked logits."""
    logits = torch.randn(5, 8)
    mask = torch.rand(5, 8) < 0.7
    mask[:, :2] = True
    index, weights = sample_widths(logits, mask, 0.7, torch.Generator().manual_seed(5))
    ref_index, ref_weights = ops.gumbel_topk(logits.masked_fill(~mask, -1e9), 2, 0.7,
                                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(index, ref_index) and torch.equal(weights, ref_weights)
    assert mask.gather(1, index).all()


def test_sample_widths_respects_mask_and_weights_are_softmax_of_selected():
    logits = torch.randn(6, 8, requires_grad=True)
    mask = torch.ones(6, 8, dtype=torch.bool)
    mask[0, 3:] = False                              # a layer with 3 candidates
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        index, w = sample_widths(logits, mask, 0.7, g)
        assert (index[0] < 3).all() and (index[:, 0] != index[:, 1]).all()
        assert torch.allclose(w.sum(1), torch.ones(6))
    w[:, 0].sum().backward()
    assert logits.grad is not None and logits.grad[mask].abs().sum() > 0
    assert logits.grad[~mask].abs().sum() == 0


@pytest.mark.parametrize("c_in,c_out", [(9, 16), (12, 16), (16, 16), (7, 32), (16, 9), (25, 64), (51, 64),
                                        (90, 128), (33, 65), (130, 128)])   # matrix and gather forms
def test_cwi_equals_adaptive_avg_pool3d_and_formula(c_in, c_out):
    x = torch.randn(3, c_in, 5, 4, dtype=torch.float64, requires_grad=True)
    y, ref = cwi(x, c_out), cwi_reference(x, c_out)
    torch.testing.assert_close(y, ref)
    # the definition: mean over [floor(o*C/C'), ceil((o+1)*C/C'))
    for o in range(c_out):
        s, e = math.floor(o * c_in / c_out), math.ceil((o + 1) * c_in / c_out)
        torch.testing.assert_close(y[:, o], x[:, s:e].mean(1))
    dy = torch.randn_like(ref)
    g1, = torch.autograd.grad(y, x, dy)
    g2, = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(g1, g2)


def _candidate_bns(widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g),
             0.1 * torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5) for c in widths]


def _packed(widths, seed=0):
    """A CandidateBN whose rows 1..K are _candidate_bns(widths) (row 0: a wider unsampled
    candidate, so the gather and the scatter of the sampled rows are exercised)."""
    bn = CandidateBN([max(widths) + 3] + list(widths))
    with torch.no_grad():
        bn.affine.normal_(); bn.stats.uniform_(0.5, 1.5)
        for j, p in enumerate(_candidate_bns(widths, seed), 1):
            c = p[0].numel()
            bn.affine[j, 0, :c], bn.affine[j, 1, :c] = p[0], p[1]
            bn.stats[j, 0, :c], bn.stats[j, 1, :c] = p[2], p[3]
    return bn, torch.arange(1, len(widths) + 1)


def _composed(o, bns, widths, w, act, training, align="cwi"):
    """TAS's layer math as its code writes it: per-candidate BN of the prefix, adaptive_avg_pool3d
    (align "cwi"); or the fragments zero-padded to the widest (align "prefix")."""
    c_max = max(widths)

    def widen(x):
        return cwi_reference(x, c_max) if align == "cwi" else F.pad(x, (0, 0, 0, 0, 0, c_max - x.size(1)))
    out = sum(w[j] * widen(F.batch_norm(o[:, :c], p[2], p[3], p[0], p[1], training, 0.1, 1e-5))
              for j, (c, p) in enumerate(zip(widths, bns)))
    return torch.relu(out) if act == "relu" else out


@pytest.mark.parametrize("align", ["cwi", "prefix"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("widths,act", [([8, 12], "relu"), ([12, 5], None), ([7], "relu")])
def test_aggregate_widths_equals_per_candidate_bn_composition(widths, act, training, align):
    """The fused aggregation (one channel_stats, BN rows gathered from the packed table and
    folded, width_aggregate op) equals TAS's composition of separate BNs in output, every
    gradient (o, gamma, beta, mixing weights) and running stats; unsampled rows are untouched.
    Both alignments: TAS's CWI, and the prefix one (zeros beyond a candidate's width)."""
    g = torch.Generator().manual_seed(len(widths))
    o = (3 * torch.randn(4, max(widths), 5, 3, generator=g) + 1).requires_grad_()
    w = torch.rand(len(widths), generator=g).softmax(0).requires_grad_()
    bn, index = _packed(widths)
    before = bn.stats.clone()
    ref_bn = [tuple(t.clone().requires_grad_(i < 2) for i, t in enumerate(p)) for p in _candidate_bns(widths)]
    out = aggregate_widths(o, widths, w, act, bn=bn, index=index, training=training, align=align)
    ref = _composed(o, ref_bn, widths, w, act, training, align)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(out, [o, w, bn.affine], dy)
    grads_ref = torch.autograd.grad(ref, [o, w] + [t for p in ref_bn for t in p[:2]], dy)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads_ref[1], rtol=1e-4, atol=1e-5)
    for j, c in enumerate(widths, 1):
        torch.testing.assert_close(grads[2][j, 0, :c], grads_ref[2 * j], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[2][j, 1, :c], grads_ref[2 * j + 1], rtol=1e-4, atol=1e-5)
    assert not grads[2][0].any()                    # the unsampled candidate gets no gradient
    for j, (c, q) in enumerate(zip(widths, ref_bn), 1):   # running statistics (changed only in training)
        torch.testing.assert_close(bn.stats[j, 0, :c], q[2]); torch.testing.assert_close(bn.stats[j, 1, :c], q[3])
    torch.testing.assert_close(bn.stats[0], before[0], rtol=0, atol=0)
    assert torch.equal(bn.stats, before) != training


def test_candidate_bn_rows_are_batchnorm_state_dicts():
    base = torch.nn.BatchNorm2d(10)
    with torch.no_grad():
        base.weight.uniform_(); base.bias.normal_(); base.running_mean.normal_(); base.running_var.uniform_(1, 2)
    bn = CandidateBN([3, 7, 10])
    bn.load_prefixes(base)
    one = torch.nn.BatchNorm2d(7)
    one.load_state_dict(bn.candidate(1))
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(one, name), getattr(base, name)[:7])


def test_aggregate_widths_without_bn_and_bad_width():
    o = torch.randn(2, 9, 4, 4)
    w = torch.tensor([0.25, 0.75])
    out = aggregate_widths(o, [4, 9], w, None)
    torch.testing.assert_close(out, 0.25 * cwi_reference(o[:, :4], 9) + 0.75 * o)
    with pytest.raises(ValueError, match="9 channels, the widest candidate 8"):
        aggregate_widths(o, [4, 8], w, None)
    bn, index = _packed([4])
    with pytest.raises(ValueError, match="more than one value per channel"):
        aggregate_widths(torch.randn(1, 4, 1, 1), [4], w[:1], None, bn=bn, index=index)
    with pytest.raises(ValueError, match="needs the sampled candidates' index"):
        aggregate_widths(torch.randn(2, 4, 1, 1), [4], w[:1], None, bn=bn)


def test_max_cost_equals_tas_published_totals():
    assert TASSupernet(3).max_cost() == pytest.approx(40.813184e6)    # ResNet-20, docs/BASELINE.md
    assert TASSupernet(9).max_cost() == pytest.approx(125.74784e6)    # ResNet-56


@pytest.mark.parametrize("n,size", [(3, 32), (9, 32), (2, 16)])
def test_expected_flops_at_one_hot_equals_exact_flops_of_derived_net(n, size):
    net = TASSupernet(n, size)
    g = torch.Generator().manual_seed(n)
    for trial in range(4):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=g))
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=g))
            if trial == 0:   # equal widths inside stages: no stride-1 projections
                for row in range(net.width_logits.size(0)):
                    net.width_logits[row, :] = 0
                    net.width_logits[row, 5] = 1
        arch = net.architecture()
        derived = tas_resnet(**arch)
        exact = flops.count(derived, torch.zeros(1, 3, size, size))
        assert float(net.cost(*net.argmax_onehot())) == exact
        # and the expectation is differentiable and strictly between min and max
        e = net.expected_cost()
        assert 0 < float(e.detach()) < net.max_cost() and e.requires_grad


def test_expected_cost_is_the_chained_expectation():
    """Depth weight P(depth >= a) and E[C] = sum p_j C_j, checked on one layer by hand."""
    net = TASSupernet(2, 8)
    wp, dp = net.probabilities()
    base = net.cost(wp, dp)
    # perturb only the last stage's depth distribution: the cost changes by the last block's
    # conv_a+conv_b cost (block index 1 of stage 2) times the change in P(depth >= 2)
    dp2 = dp.detach().clone().double()
    dp2[2] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    dp3 = dp2.clone()
    dp3[2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    wpd = wp.detach().double()
    e = (wpd * net.width_table).sum(1)
    ra, rb = 1 + 2 * 5, 2 + 2 * 5         # rows of the last block
    h = 2                                 # 8 -> 4 -> 2
    block = 9 * h * h * (e[rb - 2] * e[ra] + e[ra] * e[rb])
    proj = h * h * e[rb - 2] * e[rb] * (1 - (wpd[rb - 2] * wpd[rb]).sum())
    # with depth 2 the classifier reads block 2's width instead of block 1's
    fc = 10 * (e[rb] - e[rb - 2])
    diff = net.cost(wpd, dp3) - net.cost(wpd, dp2)
    torch.testing.assert_close(diff, block + proj + fc)
    assert base.dtype == torch.float64


def test_cost_loss_branches():
    e = torch.tensor(20.0, requires_grad=True)
    target, tol = 10.0, 2.0
    too_big = cost_loss(e, torch.tensor(10.5), target, tol)       # F > R (no tolerance above)
    assert float(too_big) == pytest.approx(math.log(20.0))
    too_small = cost_loss(e, torch.tensor(7.9), target, tol)     # F < R - t
    assert float(too_small) == pytest.approx(-math.log(20.0))
    ok = cost_loss(e, torch.tensor(8.5), target, tol)            # R - t <= F <= R
    assert float(ok) == 0.0
    g_big, = torch.autograd.grad(too_big, e)
    g_ok, = torch.autograd.grad(ok, e)
    assert float(g_big) == pytest.approx(1 / 20.0) and float(g_ok) == 0.0


def test_temperature_schedules():
    assert temperature(0, 10, 5, 0.1) == pytest.approx(5.0)
    assert temperature(5, 10, 5, 0.1) == pytest.approx(2.55)
    assert temperature(0, 11, 10, 0.1, "linear") == pytest.approx(10.0)
    assert temperature(10, 11, 10, 0.1, "linear") == pytest.approx(0.1)
    assert temperature(5, 11, 10, 0.1, "linear") == pytest.approx(5.05)
    with pytest.raises(ValueError):
        temperature(0, 10, 5, 0.1, "step")
