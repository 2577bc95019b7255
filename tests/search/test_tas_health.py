"""TAS's search health on the embedded digits: the supernet keeps what it learns as the Gumbel
temperature falls, and the expected cost ends near the arg-max cost (issue 13; docs/tas.md,
Search health)."""
import torch

from nasprune.data import load_dataset, tas_split
from nasprune.models import CifarResNet
from nasprune.search import TAS
from nasprune.train import seeded, train

SIZE = 16


def test_short_digits_search_keeps_its_accuracy_and_expected_cost_tracks_the_argmax():
    """A warm-started search (the pipeline's: a trained baseline, then TAS) of a 14-layer CIFAR
    ResNet on 16x16 digits, 12 epochs of 22 steps, cosine tau 5 -> 0.18, Adam 0.1 on the logits
    (the CLI's default for short searches). About 40 s on one thread.

    1. The search-split accuracy of the sampled supernet at the last epoch (tau < 0.3, where the
       top-2 mixture is close to one sampled path) is at least the best of the earlier epochs
       minus 5 points, and the supernet has learned (>= 0.85). Measured: last minus best -1.1,
       -2.1, -0.7 points at seeds 0-2 (last 0.92, 0.92, 0.93). TAS's channel-wise interpolation
       (align="cwi") ends at 0.72 here; on the demo's ResNet-20 at 32x32 it fell from 0.45 to
       0.31 over the last five epochs (0.20 in the issue's run).
    2. |expected - arg-max MACs| <= 0.08 of the baseline's MACs at the end. Measured: 0.03, 0.04,
       0.01 at seeds 0-2. The bound is the cost loss's zero band (0.05 of the supernet's MACs,
       which here are 1.01x the baseline's) plus a margin: the expected cost of the uniform width
       prior the search starts from is 0.31 of the baseline, so a search whose width
       distributions do not move (Adam 1e-2 here: gap 0.12; the issue's demo: 0.29 against an
       arg-max swinging from 0.36 to 0.65) fails it, while an arg-max inside or next to the band
       with distributions concentrated around it passes.
    """
    train_set, _ = load_dataset(None, size=SIZE)
    with seeded(0):
        base = CifarResNet(14)
    train(base, train_set, epochs=4, batch_size=64, lr=0.1, device="cpu", seed=0)
    weights, arch = tas_split(train_set)
    s = TAS(base, 0.5, input_size=SIZE, arch_lr=0.1, device="cpu", seed=0)
    prior = s.model.expected_cost().item() / s.base_flops
    s.search(weights, arch, epochs=12, batch_size=32)

    acc = [h["arch_acc"] for h in s.history]
    assert s.history[-1]["tau"] < 0.3
    assert acc[-1] >= max(acc[:-1]) - 0.05, acc
    assert acc[-1] >= 0.85, acc
    end = s.history[-1]
    gap = (end["expected_flops"] - end["flops"]) / s.base_flops
    assert abs(gap) <= 0.08, (end["expected_flops"] / s.base_flops, end["flops_ratio"])
    assert prior < end["flops_ratio"] - 0.1        # the bound would fail a search left at the prior
