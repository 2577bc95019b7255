import math

import torch

from nasprune.data import load_dataset
from nasprune.models import CifarResNet
from nasprune.train import evaluate, kd_loss, train


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
