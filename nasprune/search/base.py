"""The searcher API every method shares.

A method is a subclass of :class:`Searcher` that sets ``method`` (its name) and ``config`` (its
JSON-able configuration) and implements

- ``step(*batches) -> dict``: one search iteration (what benchmarks time); metrics as tensors
  or numbers, read once per step;
- ``export(...) -> nn.Module``: the plain pruned network;
- ``architecture() -> dict``: keep-based for every method (:func:`keep_architecture`): the
  method, per-layer original and kept widths, MACs and params of the export, plus whatever the
  method needs to rebuild its export;
- ``method_state()`` / ``load_method_state(state)``: what a checkpoint holds beyond the base's.

The loop's shape is the method's choice, through hooks with bi-level defaults (a weight split
and an architecture split, both shuffled and augmented, as TAS and DAIS search):

- ``loaders(data, val_data, batch_size) -> {name: DeviceLoader}``: which data, split how,
  augmented or not, in which order (FFP: a small un-augmented search set in order; PaS: the
  training set alone, no architecture split). :meth:`Searcher.loader` builds one.
- ``iterate(loaders)``: the step arguments of one epoch (default: every batch of the first
  loader, each with the next batch of every other, drawn epoch after epoch through
  :meth:`Searcher.next_batch`); ``epoch_length(loaders)``: its number of steps.
- ``begin_epoch``, ``epoch_metrics`` (a row of ``history``), ``finished`` (stop early).

The base owns the rest: ``seed``, ``device``, the step counter ``global_step``, ``history``, the
epoch loop, callbacks (progress is one: the library draws no bar), checkpoints, and refusing
to resume a checkpoint written under another configuration.

Checkpoints are one safetensors file (``nasprune.io.save_atomic``): every tensor (model,
optimiser state, loader positions, random generators) plus a JSON header for the rest; a killed
run leaves either the old or the new checkpoint. Nothing is pickled. Resuming with the same
configuration replays the remaining steps exactly.

Under torchrun (an initialised torch.distributed process group, :mod:`nasprune.dist`) every rank
runs the same search on the same seeded randomness: the loaders give each rank its slice of every
global batch, the optimisers the searcher lists in ``optimizers`` average their gradients across
ranks before they step, the step metrics and a method's running epoch sums (``_sums``, a tensor)
are averaged, rank 0's weights start every rank, and rank 0 alone writes the checkpoint (which
every rank resumes from, read by rank 0 and sent to the others).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from nasprune import dist

_META = "nasprune.checkpoint"
CHECKPOINT_FORMAT = "nasprune.search/2"
ARCHITECTURE_KEYS = ("method", "layer_widths", "macs", "params")


class Callback:
    """Hooks called by :meth:`Searcher.search`; override what you need. ``on_search_begin``
    comes after a resumed checkpoint is loaded: ``searcher.global_step`` of
    ``searcher.epochs * searcher.steps_per_epoch`` steps are done."""

    def on_search_begin(self, searcher): ...
    def on_step_end(self, searcher, step: int, metrics: dict): ...
    def on_epoch_end(self, searcher, epoch: int, metrics: dict): ...
    def on_search_end(self, searcher): ...


class ConfigMismatchError(ValueError):
    """A checkpoint written by a search of another configuration."""


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


def _json(value):
    """``value`` as JSON gives it back (tuples become lists), for comparing configurations."""
    return json.loads(json.dumps(value))


def config_differences(recorded: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, recorded value, current value) of every key whose values differ; a key only
    one side has shows ``"<absent>"`` on the other."""
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        a, b = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append((name, a, b))
    return out


def _floats(metrics: dict) -> dict:
    """Metrics as Python floats, the tensors read in one host copy."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    device = next(iter(tensors.values())).device if tensors else None
    values = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in tensors.values()]).tolist() \
        if tensors else []
    read = dict(zip(tensors, values))
    return {k: read[k] if k in read else float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------ architectures
def keep_architecture(method: str, layer_widths: list, macs, params, **extra) -> dict:
    """The keep-based architecture dict every searcher returns: ``method``; ``layer_widths``,
    one ``{"name", "original", "kept"}`` per layer (module name in the unpruned model, its
    output width there and in the pruned network; 0 for a layer the pruning removed); ``macs``
    and ``params`` of the pruned network; and the method's own keys (``extra``)."""
    rows = []
    for row in layer_widths:
        name, original, kept = str(row["name"]), int(row["original"]), int(row["kept"])
        if not 0 <= kept <= original:
            raise ValueError(f"layer {name}: kept width {kept} outside 0..{original}")
        rows.append({"name": name, "original": original, "kept": kept})
    return {"method": str(method), "layer_widths": rows, "macs": int(round(float(macs))),
            "params": int(params), **extra}


def layer_widths(original: nn.Module, pruned: nn.Module) -> list[dict]:
    """Per-layer original and kept output widths of every conv and linear layer of
    ``original``, matched by module name in ``pruned`` (``nasprune.slim.apply`` keeps the names;
    a layer missing there was removed: kept 0)."""
    kept_modules = dict(pruned.named_modules())

    def width(m):
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.out_channels
        if isinstance(m, nn.Linear):
            return m.out_features
        return None
    rows = []
    for name, m in original.named_modules():
        w = width(m)
        if w is not None:
            k = width(kept_modules[name]) if name in kept_modules else None
            rows.append({"name": name, "original": w, "kept": k or 0})
    return rows


def pruned_architecture(method: str, original: nn.Module, pruned: nn.Module, example_inputs, **extra) -> dict:
    """:func:`keep_architecture` of a pruned network whose layers keep the names they have in
    ``original``: its layer widths, counted MACs and params."""
    from nasprune import flops
    return keep_architecture(method, layer_widths(original, pruned), flops.count(pruned, example_inputs),
                             flops.count_params(pruned), **extra)


# ------------------------------------------------------------------ the searcher
class Searcher:
    """Base class of the search methods (module docstring: what a method implements, which
    hooks shape its loop)."""

    method: str = ""
    model: nn.Module

    def __init__(self, *, seed: int = 0, device=None):
        self.seed = int(seed)
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config: dict = {}
        self.global_step, self.history = 0, []
        self.epochs = self.steps_per_epoch = 0
        self._streams: dict = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}   # averaged across ranks under torchrun

    # -- what a method implements
    def step(self, *batches) -> dict:
        raise NotImplementedError

    def export(self) -> nn.Module:
        raise NotImplementedError

    def architecture(self) -> dict:
        raise NotImplementedError

    def method_state(self) -> dict:
        return {}

    def load_method_state(self, state: dict) -> None:
        pass

    # -- hooks that shape the loop
    def loader(self, data, batch_size: int, *, shuffle: bool = True, augment: bool = True,
               drop_last: bool = True, offset: int = 0):
        """A DeviceLoader of ``data`` on the searcher's device, its randomness seeded with
        ``seed + offset`` (a DeviceLoader is returned as it is)."""
        from nasprune.data import DeviceLoader
        if isinstance(data, DeviceLoader):
            return data
        return DeviceLoader(data, batch_size, shuffle=shuffle, augment=augment, drop_last=drop_last,
                            device=self.device, seed=self.seed + offset)

    def loaders(self, data, val_data, batch_size: int) -> dict:
        """Bi-level: weight batches from ``data``, architecture batches from ``val_data``, both
        shuffled and augmented; without ``val_data``, ``data`` is split per class 50/50
        (``nasprune.data.tas_split``, seed 111)."""
        if val_data is None:
            from nasprune.data import tas_split
            data, val_data = tas_split(data)
        return {"weights": self.loader(data, batch_size), "arch": self.loader(val_data, batch_size, offset=1)}

    def next_batch(self, loader):
        """The next batch of ``loader``, epoch after epoch (each reshuffled), continuing where
        the search left it (also across a resume)."""
        stream = self._streams.get(id(loader))
        if stream is None:
            stream = self._streams[id(loader)] = loader.cycle()
        return next(stream)

    def iterate(self, loaders: dict):
        """The step arguments of one epoch: each batch of the first loader with the next batch
        of every other loader."""
        first, *rest = loaders.values()
        for batch in first:
            yield (batch, *(self.next_batch(other) for other in rest))

    def epoch_length(self, loaders: dict) -> int:
        return len(next(iter(loaders.values())))

    def begin_epoch(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        """Set per-epoch schedules (temperature...)."""

    def epoch_metrics(self) -> dict:
        return {}

    def finished(self) -> bool:
        """True to end the search before its last epoch (e.g. once a budget is met)."""
        return False

    # -- state
    def state_dict(self) -> dict:
        return {"method": self.method, "config": self.config, "global_step": self.global_step,
                "history": self.history, "method_state": self.method_state()}

    def load_state_dict(self, state: dict) -> None:
        self.check_config({"method": state.get("method"), **state.get("config", {})},
                          {"method": self.method, **self.config}, "searcher state")
        self.global_step, self.history = int(state["global_step"]), list(state["history"])
        self.load_method_state(state["method_state"])

    @staticmethod
    def check_config(recorded: dict, current: dict, where) -> None:
        """Raise ConfigMismatchError naming every key whose value differs."""
        diff = config_differences(_json(recorded), _json(current))
        if diff:
            detail = "; ".join(f"{k}: checkpoint {a!r}, this search {b!r}" for k, a, b in diff)
            raise ConfigMismatchError(f"{where}: written by a search of another configuration ({detail}); "
                                      f"resume with the same configuration, or start afresh (another "
                                      f"checkpoint path, or without resume)")

    def _average_sums(self) -> None:
        """A method's running epoch sums (``_sums``), averaged across ranks under torchrun."""
        if isinstance(getattr(self, "_sums", None), torch.Tensor):
            dist.all_reduce_mean_([self._sums])

    # -- the schedule
    def search(self, data, val_data=None, epochs: int | None = None, *, batch_size: int = 256, checkpoint=None,
               resume: bool = False, checkpoint_every: int = 0, callbacks=()):
        """Run the search for ``epochs`` epochs and return ``self.architecture()``.

        data, val_data: ImageDatasets or DeviceLoaders, given to :meth:`loaders` (the method's
        split: by default weight and architecture batches, ``data`` split in two when
        ``val_data`` is None). checkpoint: path of the checkpoint file, written at the end of
        every epoch and every ``checkpoint_every`` steps; resume: continue from it if it exists,
        refused (ConfigMismatchError) if it was written under another configuration (the
        searcher's, the epochs, the batch sizes or the split sizes). callbacks: :class:`Callback`
        objects (the command line's progress bar and log are two).
        """
        if epochs is None or epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        loaders = self.loaders(data, val_data, batch_size)
        for name, loader in loaders.items():
            if len(loader) == 0:
                raise ValueError(f"batch_size {loader.batch_size} is larger than the {name} split "
                                 f"({loader.num_samples} samples)")
        steps = self.epoch_length(loaders)
        self.epochs, self.steps_per_epoch, self._streams = epochs, steps, {}
        config = _json({"method": self.method, **self.config,
                        "search": {"epochs": epochs, "steps_per_epoch": steps,
                                   "batch_size": {n: lo.batch_size for n, lo in loaders.items()},
                                   "samples": {n: lo.num_samples for n, lo in loaders.items()}}})
        start_epoch = epoch_step = 0
        state = None
        if resume and checkpoint is not None and dist.is_main() and os.path.exists(checkpoint):
            state = load_checkpoint(checkpoint)
        state = dist.broadcast_object(state)
        if state is not None:
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ConfigMismatchError(f"{checkpoint}: a checkpoint of an earlier nasprune (format "
                                          f"{state.get('format', 'nasprune.search/1')!r}, this one writes "
                                          f"{CHECKPOINT_FORMAT!r}); start afresh without resume")
            self.check_config(state["config"], config, checkpoint)
            self.load_state_dict(state["searcher"])
            for name, loader in loaders.items():
                loader.load_state_dict(state["loaders"][name])
            start_epoch, epoch_step = int(state["epoch"]), int(state["epoch_step"])

        for opt in getattr(self, "optimizers", {}).values():
            dist.average_gradients_before_step(opt)
        if isinstance(getattr(self, "model", None), nn.Module):
            dist.broadcast_module_(self.model)     # every rank starts from rank 0's weights

        def save(next_epoch, step_in_epoch):
            if checkpoint is not None:
                self._average_sums()     # every rank resumes from rank 0's sums: make them the global ones
            if checkpoint is not None and dist.is_main():
                save_checkpoint(checkpoint, {"format": CHECKPOINT_FORMAT, "config": config, "epoch": next_epoch,
                                             "epoch_step": step_in_epoch, "searcher": self.state_dict(),
                                             "loaders": {n: lo.state_dict() for n, lo in loaders.items()}})

        for cb in callbacks:
            cb.on_search_begin(self)
        for epoch in range(start_epoch, epochs):
            if self.finished():
                break
            self.begin_epoch(epoch, epochs, steps)
            for batches in self.iterate(loaders):
                metrics = self.step(*batches)
                self.global_step += 1
                epoch_step += 1
                metrics = _floats(dist.mean_metrics(metrics))
                for cb in callbacks:
                    cb.on_step_end(self, self.global_step, metrics)
                if checkpoint_every and self.global_step % checkpoint_every == 0 and epoch_step < steps:
                    save(epoch, epoch_step)  # mid-epoch: resume continues this epoch where the loaders stand
            epoch_step = 0
            self._average_sums()
            row = {"epoch": epoch + 1, **self.epoch_metrics()}
            self.history.append(row)
            for cb in callbacks:
                cb.on_epoch_end(self, epoch + 1, row)
            save(epoch + 1, 0)
        for cb in callbacks:
            cb.on_search_end(self)
        return self.architecture()
