"""The searcher API every method shares: ``step`` (one search iteration, what benchmarks time),
``search`` (the schedule, with callbacks, progress and checkpoints), ``export`` (a plain
slimmed nn.Module), ``architecture`` (a JSON-able dict).

Checkpoints are one safetensors file: every tensor (model, optimiser state, loader positions,
random generators) plus a JSON header for the rest; written to a temporary file and moved into
place with os.replace, so a killed run leaves either the old or the new checkpoint. Nothing is
pickled. Resuming with the same seed replays the remaining steps exactly.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

_META = "nasprune.checkpoint"


class Callback:
    """Hooks called by :meth:`Searcher.search`; override what you need."""

    def on_search_begin(self, searcher): ...
    def on_step_end(self, searcher, step: int, metrics: dict): ...
    def on_epoch_end(self, searcher, epoch: int, metrics: dict): ...
    def on_search_end(self, searcher): ...


# ------------------------------------------------------------------ state (de)flattening
def flatten_state(prefix: str, obj, tensors: dict):
    """Nested dicts/lists with tensors -> JSON-able structure; tensors go to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(f"{prefix}/{i}", k, tensors), flatten_state(f"{prefix}/{i}v", v, tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten_state(f"{prefix}/{i}", v, tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def unflatten_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [unflatten_state(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(path, state: dict) -> None:
    """Atomically write ``state`` (nested dicts of tensors and JSON values) to ``path``."""
    from nasprune.io import save_atomic
    tensors: dict = {}
    meta = json.dumps(flatten_state("s", state, tensors))
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    save_atomic(tensors, path, {_META: meta})


def load_checkpoint(path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = os.fspath(path)
    with safe_open(path, framework="pt") as fh:
        meta = (fh.metadata() or {}).get(_META)
    if meta is None:
        raise ValueError(f"{path}: not a nasprune search checkpoint")
    return unflatten_state(json.loads(meta), load_file(path))


# ------------------------------------------------------------------ the searcher
class Searcher:
    """Base class. Subclasses implement ``step``, ``export``, ``architecture``, ``begin_epoch``,
    ``state_dict`` / ``load_state_dict`` and ``epoch_metrics``."""

    model: nn.Module
    device: torch.device

    def step(self, weight_batch, arch_batch) -> dict:
        raise NotImplementedError

    def export(self) -> nn.Module:
        raise NotImplementedError

    def architecture(self) -> dict:
        raise NotImplementedError

    def begin_epoch(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        """Set per-epoch schedules (temperature...)."""

    def epoch_metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    # -- the schedule
    def _loaders(self, train_data, val_data, batch_size):
        from nasprune.data import DeviceLoader
        if isinstance(train_data, DeviceLoader):
            return train_data, val_data
        wl = DeviceLoader(train_data, batch_size, shuffle=True, augment=True, drop_last=True,
                          device=self.device, seed=self.seed)
        al = DeviceLoader(val_data, batch_size, shuffle=True, augment=True, drop_last=True,
                          device=self.device, seed=self.seed + 1)
        return wl, al

    def search(self, train_data, val_data, epochs: int, *, batch_size: int = 256, checkpoint=None,
               resume: bool = False, checkpoint_every: int = 0, callbacks=(), progress: bool = False):
        """Alternate weight and architecture updates for ``epochs`` epochs over ``train_data``
        (weight split) drawing architecture batches from ``val_data`` (architecture split).

        Datasets (ImageDataset) or DeviceLoaders. checkpoint: path of the checkpoint file,
        written at the end of every epoch and every ``checkpoint_every`` steps; resume: start
        from it if it exists. Returns ``self.architecture()``.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        wl, al = self._loaders(train_data, val_data, batch_size)
        if len(wl) == 0 or len(al) == 0:
            raise ValueError(f"batch_size {batch_size} is larger than a split "
                             f"({wl.num_samples} / {al.num_samples} samples)")
        self.epochs, self.steps_per_epoch = epochs, len(wl)
        start_epoch = 0
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            state = load_checkpoint(checkpoint)
            self.load_state_dict(state["searcher"])
            wl.load_state_dict(state["weight_loader"])
            al.load_state_dict(state["arch_loader"])
            start_epoch = state["epoch"]
        arch_batches = al.cycle()

        def save(next_epoch):
            if checkpoint is not None:
                save_checkpoint(checkpoint, {"searcher": self.state_dict(), "epoch": next_epoch,
                                             "weight_loader": wl.state_dict(), "arch_loader": al.state_dict()})

        for cb in callbacks:
            cb.on_search_begin(self)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs * len(wl), initial=start_epoch * len(wl), desc="TAS search",
                       unit="step", dynamic_ncols=True)
        for epoch in range(start_epoch, epochs):
            self.begin_epoch(epoch, epochs, len(wl))
            for weight_batch in wl:
                metrics = self.step(weight_batch, next(arch_batches))
                metrics = {k: float(v) for k, v in zip(metrics, torch.stack(
                    [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in metrics.values()]).tolist())}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", mflops=f"{metrics['flops'] / 1e6:.2f}",
                                    tau=f"{self.tau:.2f}")
                for cb in callbacks:
                    cb.on_step_end(self, self.global_step, metrics)
                if checkpoint_every and self.global_step % checkpoint_every == 0 and wl._position < len(wl):
                    save(epoch)  # mid-epoch: resume continues this epoch where the loaders stand
            epoch_metrics = {"epoch": epoch + 1, **self.epoch_metrics()}
            self.history.append(epoch_metrics)
            for cb in callbacks:
                cb.on_epoch_end(self, epoch + 1, epoch_metrics)
            save(epoch + 1)
        if bar is not None:
            bar.close()
        for cb in callbacks:
            cb.on_search_end(self)
        return self.architecture()
