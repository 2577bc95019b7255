import math

import pytest
import torch

from nasprune.data import load_dataset
from nasprune.models import CifarResNet
from nasprune.train import evaluate, kd_loss, seeded, train


def test_kd_loss_matches_formula():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    lam, temp = 0.9, 4.0
    ps, pt = torch.softmax(s / temp, 1), torch.softmax(t / temp, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    expected = (1 - lam) * ce + lam * temp ** 2 * kl
    assert math.isclose(float(kd_loss(s, t, y, lam, temp)), float(expected), rel_tol=1e-12)
    # lambda 0 is plain CE, and identical logits give zero KL
    assert math.isclose(float(kd_loss(s, s, y, 0.9, 4.0)), 0.1 * float(ce), rel_tol=1e-12)


def test_train_learns_digits_and_kd_student_beats_chance():
    train_set, test_set = load_dataset(None, size=16)
    torch.manual_seed(0)
    teacher = CifarResNet(8)
    hist = train(teacher, train_set, epochs=3, batch_size=64, test_data=test_set, device="cpu")
    assert hist[-1]["test_acc"] > 0.6 and hist[-1]["loss"] < hist[0]["loss"]
    student = CifarResNet(8)
    train(student, train_set, epochs=2, batch_size=64, teacher=teacher, device="cpu")
    assert evaluate(student, test_set)["acc"] > 0.3


def _dropout_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))


def test_train_leaves_the_global_rng_alone_and_is_reproducible_from_its_seed():
    """train draws its randomness (data order, augmentation, dropout) from seeded copies of the
    global generators: the caller's state is the same afterwards, and the result depends on seed
    alone, not on the state the caller left the global generator in."""
    train_set, _ = load_dataset(None, size=8)
    small = train_set.subset(range(256))
    results = []
    for outer in (1, 2):
        torch.manual_seed(100)
        init = _dropout_net()
        torch.manual_seed(outer)                      # a different caller state each time
        before = torch.get_rng_state()
        steps = []
        train(init, small, epochs=2, batch_size=64, device="cpu", seed=7,
              on_step=lambda step, total: steps.append((step, total)))
        assert torch.equal(torch.get_rng_state(), before)
        assert steps == [(i, 8) for i in range(1, 9)]
        results.append(torch.cat([p.detach().flatten() for p in init.parameters()]))
    assert torch.equal(results[0], results[1])
    torch.manual_seed(100)
    other = _dropout_net()
    train(other, small, epochs=2, batch_size=64, device="cpu", seed=8)
    assert not torch.equal(torch.cat([p.detach().flatten() for p in other.parameters()]), results[0])


def test_seeded_restores_the_generator_even_after_an_error():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with seeded(3):
            a = torch.rand(3)
            raise RuntimeError
    assert torch.equal(torch.get_rng_state(), before)
    with seeded(3):
        assert torch.equal(torch.rand(3), a)
    assert torch.equal(torch.get_rng_state(), before)
