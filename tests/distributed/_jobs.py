"""What the 2-process tests run on every rank, and in one process for the reference: small
searches and a fine-tuning on 16x16 digits, each returning what the tests compare."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasprune import dist
from nasprune.data import DeviceLoader, load_dataset
from nasprune.models import CifarResNet
from nasprune.search import AST, DAIS, TAS
from nasprune.train import evaluate, train
from tests.search._kill import Kill

SIZE = 16


class Plain(nn.Module):
    """conv-relu x3, global pool, linear: no batch normalisation, so the ranks' batch slices
    together compute exactly the one-process batch (BatchNorm's per-rank statistics would not)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def digits(n=256):
    train, test = load_dataset(None, size=SIZE)
    return train.subset(range(n)), test.subset(range(200))


def _weights(module):
    """Parameters (buffers apart: each rank keeps its own slice's BatchNorm running statistics)."""
    return {k: v.detach().cpu().clone() for k, v in module.named_parameters()}


def dais(rank, checkpoint=None, kill_at=None, resume=False):
    """DAIS on the plain net: 2 epochs of 3 steps (global batch 32), a checkpoint every 2 steps."""
    torch.manual_seed(0)
    data, _ = digits()
    s = DAIS(Plain(), 0.5, input_size=SIZE, device="cpu", alpha_init=0.5, alpha_lr=0.2, lr=0.05)
    callbacks = [Kill(kill_at)] if kill_at else []
    arch = s.search(data, epochs=2, batch_size=32, checkpoint=checkpoint, checkpoint_every=2 if checkpoint else 0,
                    resume=resume, callbacks=callbacks)
    return {"keep": arch["keep"], "macs": arch["macs"], "base_macs": s.gn.base_macs, "num_gates": s.gn.num_gates,
            "weights": _weights(s.gn), "history": s.history, "world_size": dist.world_size()}


def ast(rank):
    """AST (warm start) on the plain net: 2 epochs of 6 steps (global batch 32), 3 sub-networks."""
    torch.manual_seed(0)
    data, _ = digits()
    s = AST(Plain(), 0.6, input_size=SIZE, device="cpu", start="warm", subnets=3, val_batches=2, lr=0.05,
            alpha_lr=0.05, seed=1)
    arch = s.search(data, epochs=2, batch_size=32)
    return {"keep": arch["keep"], "rewards": [e["reward"] for e in s.episodes],
            "subnet_keeps": [e["keep"] for e in s.episodes], "weights": _weights(s.gn),
            "policy": _weights(s.policy), "world_size": dist.world_size()}


def _constant_loader(n, seed, offset):
    """One digit image n times with random labels: batch statistics of any slice of a batch equal
    those of the whole batch, so a BatchNorm network (TAS's ResNets) computes on its slices what
    one process computes on the batch."""
    train, _ = load_dataset(None, size=SIZE)
    images = torch.as_tensor(np.repeat(train.images[:1], n, axis=0))
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(100 + offset))
    return DeviceLoader(images, 32, labels=labels, shuffle=True, drop_last=True, device="cpu", seed=seed + offset)


def tas(rank):
    """TAS on a ResNet-8 (BatchNorm) over constant-image splits: 6 steps, global batch 32."""
    torch.manual_seed(0)
    s = TAS(CifarResNet(8), 0.5, input_size=SIZE, device="cpu", seed=3, arch_lr=0.05)
    arch = s.search(_constant_loader(96, 3, 0), _constant_loader(96, 3, 1), epochs=2)
    return {"widths": arch["widths"], "blocks": arch["blocks"], "weights": _weights(s.model),
            "generator": s.generator.get_state()}


def initial_plain():
    torch.manual_seed(0)
    return _weights(Plain())


def finetune(rank):
    """train() (DistributedDataParallel under torchrun) of the plain net, 2 epochs, global batch 32."""
    torch.manual_seed(0)
    data, test = digits()
    model = Plain()
    history = train(model, data, epochs=2, batch_size=32, lr=0.05, test_data=test, device="cpu", seed=1)
    return {"weights": _weights(model), "history": history, "eval": evaluate(model, test, batch_size=64)}
