"""gumbel_topk: sampling frequencies against the exact without-replacement probabilities
(seeded, so the assertions are deterministic), TAS's mixing weights and their gradient."""
import itertools
import math

import pytest
import torch

from nasprune.ops import gumbel_topk
from nasprune.ops.gumbel import gumbel_noise

DRAWS = 200_000


def _ordered_pair_probs(p):
    """P(first = a, second = b) of two draws without replacement from p."""
    return {(a, b): p[a] * p[b] / (1 - p[a]) for a, b in itertools.permutations(range(len(p)), 2)}


def _assert_frequencies(index, probs, draws):
    codes = index[:, 0] * 64 + index[:, 1]
    counts = torch.bincount(codes, minlength=64 * 64)
    for (a, b), p in probs.items():
        freq = counts[a * 64 + b].item() / draws
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(freq - p) < 5 * sigma + 1e-9, (a, b, freq, p)
    assert sum(counts[a * 64 + b].item() for a, b in probs) == draws  # distinct, in range


def test_selection_is_sampling_without_replacement_from_p_hat():
    """With the perturbation g fixed, the selected ordered pairs follow p_hat exactly."""
    gen = torch.Generator().manual_seed(1234)
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0])
    g = gumbel_noise(logits, gen)
    tau = 2.0
    p_hat = torch.softmax((torch.log_softmax(logits, 0) + g) / tau, 0).double().tolist()
    index, weights = gumbel_topk(logits.expand(DRAWS, 4), 2, tau, generator=gen,
                                 gumbel=g.expand(DRAWS, 4))
    assert index.shape == weights.shape == (DRAWS, 2) and index.dtype == torch.int64
    _assert_frequencies(index, _ordered_pair_probs(p_hat), DRAWS)


def test_without_noise_selection_follows_softmax_of_logits():
    gen = torch.Generator().manual_seed(7)
    logits = torch.tensor([1.0, 0.2, -0.5])
    index, weights = gumbel_topk(logits.expand(DRAWS, 3), 2, 0.0, generator=gen)
    p = torch.softmax(logits, 0).double().tolist()
    _assert_frequencies(index, _ordered_pair_probs(p), DRAWS)
    # weights: the selected probabilities, renormalised
    sel = torch.softmax(logits, 0)[index]
    torch.testing.assert_close(weights, sel / sel.sum(-1, keepdim=True))


def test_large_temperature_makes_every_pair_equally_likely():
    """The whole TAS draw (fresh g each time): tau -> infinity flattens p_hat to uniform."""
    gen = torch.Generator().manual_seed(99)
    logits = torch.tensor([2.0, 0.0, -2.0])
    index, weights = gumbel_topk(logits.expand(DRAWS, 3), 2, 1e6, generator=gen)
    _assert_frequencies(index, {pair: 1 / 6 for pair in itertools.permutations(range(3), 2)},
                        DRAWS)
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5), atol=1e-4, rtol=0)


def test_weights_are_tas_renormalised_softmax_and_carry_the_gradient():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 8, requires_grad=True)  # five layers' candidates sampled at once
    g = gumbel_noise(logits, gen)
    index, weights = gumbel_topk(logits, 2, 0.7, generator=gen, gumbel=g)
    assert (index[:, 0] != index[:, 1]).all()
    perturbed = (torch.log_softmax(logits, -1) + g) / 0.7
    expected = torch.softmax(perturbed.gather(-1, index), -1)
    torch.testing.assert_close(weights, expected)
    assert torch.allclose(weights.sum(-1), torch.ones(5))
    coeff = torch.randn(5, 2)
    (grad,) = torch.autograd.grad((weights * coeff).sum(), logits)
    (grad_expected,) = torch.autograd.grad((expected * coeff).sum(), logits)
    torch.testing.assert_close(grad, grad_expected)
    assert grad.abs().sum() > 0


def test_seeded_draws_repeat():
    logits = torch.randn(64, 8)
    draw = lambda seed: gumbel_topk(logits, 2, 1.0, generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_noise_is_finite_and_low_precision_logits_work():
    e = gumbel_noise(torch.empty(1_000_000), torch.Generator().manual_seed(0))
    assert torch.isfinite(e).all()
    assert abs(e.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni: the Gumbel mean
    index, weights = gumbel_topk(torch.randn(3, 8).bfloat16(), 3, 1.0)
    assert weights.dtype == torch.float32 and index.shape == (3, 3)


@pytest.mark.parametrize("k", [0, 9])
def test_bad_k(k):
    with pytest.raises(ValueError, match=r"k must lie in \[1, 8\]"):
        gumbel_topk(torch.randn(8), k, 1.0)
