"""Training, evaluation and knowledge-distillation fine-tuning (TAS methods.md 2.7).

KD loss: (1 - lambda) * CE(z, y) + lambda * T^2 * KL(softmax(t/T) || softmax(z/T)), batch-mean KL,
lambda 0.9, T 4. Optimiser: SGD nesterov, momentum 0.9, cosine decay to 0 per step, optional
linear warm-up, weight decay 5e-4.

The library draws no progress bar: ``train`` reports through its ``on_step`` / ``on_epoch``
callbacks (the command line draws its bars with them). Nothing here reseeds the caller's global
random generators: :func:`seeded` runs a block on seeded copies of them and restores them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from nasprune import dist


def kd_loss(student_logits, teacher_logits, targets, lam: float = 0.9, temperature: float = 4.0):
    """TAS's knowledge-transfer loss (official code form: KL with batch-mean reduction times T^2)."""
    ce = F.cross_entropy(student_logits, targets)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                  reduction="batchmean")
    return (1 - lam) * ce + lam * temperature * temperature * kl


@contextmanager
def seeded(seed: int, device=None):
    """Run the block with torch's global generators (the CPU one and, for a CUDA ``device``, that
    device's) seeded with ``seed``, and give the caller's generators back unchanged afterwards.
    Library code that needs reproducible global randomness (parameter initialisation, dropout)
    uses this instead of torch.manual_seed, which would reseed the user's generators."""
    device = torch.device(device if device is not None else "cpu")
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield


def _loader(data, batch_size, device, *, train, seed=0):
    from nasprune.data import DeviceLoader
    if isinstance(data, DeviceLoader):
        return data
    return DeviceLoader(data, batch_size, shuffle=train, augment=train, drop_last=train and len(data) > batch_size,
                        device=device, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 256, device=None) -> dict:
    """Top-1 accuracy and mean CE of ``model`` on ``data`` (ImageDataset or DeviceLoader)."""
    device = torch.device(device or next(model.parameters()).device)
    was = model.training
    model.eval()
    correct = loss = n = 0.0
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    loader = _loader(data, batch_size, device, train=False)
    for x, y in loader:
        z = model(x)
        sums += torch.stack([(z.argmax(1) == y).double().sum(), F.cross_entropy(z, y, reduction="sum").double(),
                             torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    model.train(was)
    if loader.world_size > 1:       # each rank evaluated its shard
        dist.all_reduce_sum_(sums)
    correct, loss, n = sums.tolist()
    return {"acc": correct / max(n, 1), "loss": loss / max(n, 1)}


def train(model: nn.Module, train_data, *, epochs: int, batch_size: int = 128, lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 0, teacher: nn.Module | None = None,
          kd_lambda: float = 0.9, kd_temperature: float = 4.0, test_data=None, device=None, seed: int = 0,
          on_step=None, on_epoch=None, loss_fn=None, sync_batchnorm: bool = False) -> list[dict]:
    """Train ``model`` in place (CE, or KD from ``teacher`` when given, or ``loss_fn``). Returns
    per-epoch history dicts (epoch, loss, train_acc, and test_acc when test_data is given).

    loss_fn(model, batch) -> (loss, logits, targets): the loss of one batch of ``train_data``
    (whatever its loader yields, e.g. two views and sample indices), and logits with their
    targets for the running accuracy; it replaces CE and KD (``teacher`` must then be None).

    seed: the data order and augmentation, and any global randomness the model draws (dropout),
    on seeded copies of the global generators (the caller's are left as they were).
    on_step(step, total_steps): called after every optimiser step (no host synchronisation);
    on_epoch(row): called with each epoch's history row.

    Under torchrun (an initialised process group of several ranks) the model trains wrapped in
    DistributedDataParallel (rank 0's weights first copied to every rank), each rank on its
    slice of every global batch of ``batch_size``; the history's figures are the global ones.
    sync_batchnorm: batch statistics over the global batch (torch's SyncBatchNorm, CUDA only;
    the model's BatchNorm layers are put back afterwards); otherwise each rank normalises with
    its own slice's statistics, and rank 0's running statistics are every rank's."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if loss_fn is not None and teacher is not None:
        raise ValueError("give either teacher (KD) or loss_fn, not both")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    loader = _loader(train_data, batch_size, device, train=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    net, synced = _distributed(model, device, sync_batchnorm)
    try:
        return _train_loop(net, model, loader, opt, epochs=epochs, lr=lr, warmup_epochs=warmup_epochs,
                           teacher=teacher, kd_lambda=kd_lambda, kd_temperature=kd_temperature, test_data=test_data,
                           device=device, seed=seed, on_step=on_step, on_epoch=on_epoch, loss_fn=loss_fn)
    finally:
        if synced:
            _plain_batchnorm(model)


def _distributed(model: nn.Module, device, sync_batchnorm: bool):
    """(the module to call, whether BatchNorm layers were made SyncBatchNorm): ``model`` itself
    in one process, else ``model`` wrapped in DistributedDataParallel."""
    if not dist.is_distributed():
        return model, False
    from torch.nn.parallel import DistributedDataParallel
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError(f"sync_batchnorm needs CUDA tensors (torch's SyncBatchNorm), the model is on {device}")
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids), sync_batchnorm


def _plain_batchnorm(module: nn.Module) -> None:
    """Put BatchNorm2d layers back where SyncBatchNorm replaced them (same parameters and buffers)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats, device=child.running_mean.device if
                                child.running_mean is not None else None)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            _plain_batchnorm(child)


def _train_loop(net, model, loader, opt, *, epochs, lr, warmup_epochs, teacher, kd_lambda, kd_temperature, test_data,
                device, seed, on_step, on_epoch, loss_fn) -> list[dict]:
    steps_per_epoch, history = len(loader), []
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step = 0
    with seeded(seed, device):
        for epoch in range(epochs):
            model.train()
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            for batch in loader:
                if step < warm:
                    cur = lr * (step + 1) / warm
                else:
                    cur = 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
                for g in opt.param_groups:
                    g["lr"] = cur
                if loss_fn is not None:
                    loss, z, y = loss_fn(net, batch)
                elif teacher is None:
                    x, y = batch
                    z = net(x)
                    loss = F.cross_entropy(z, y)
                else:
                    x, y = batch
                    z = net(x)
                    with torch.no_grad():
                        t = teacher(x)
                    loss = kd_loss(z, t, y, kd_lambda, kd_temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                sums += torch.stack([loss.detach().double() * y.numel(), (z.detach().argmax(1) == y).double().sum(),
                                     torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
                if on_step is not None:
                    on_step(step, total)
            if loader.world_size > 1:
                dist.all_reduce_sum_(sums)
            loss_sum, correct, n = sums.tolist()
            row = {"epoch": epoch + 1, "loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1)}
            if test_data is not None:
                row["test_acc"] = evaluate(model, test_data, device=device)["acc"]
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
    return history
