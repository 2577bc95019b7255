"""Saving and loading slimmed models without pickle: ``nasprune.save`` / ``nasprune.load``.

One ``.safetensors`` file holds the weights and, in its header metadata, the architecture as
JSON: the base model's class (and constructor, when known), and for every slimming step the
example input shapes, the channel-graph fingerprint and the kept channels per group. Loading
re-traces a fresh base model, re-applies the steps and loads the weights; a sha256 over the
architecture and every tensor catches truncated or altered files. A failed load raises and
changes nothing: the base model is never modified.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import tempfile

import torch
from torch import nn

FORMAT = "nasprune.slim/1"
_ARCH_KEY = "nasprune.architecture"
_HASH_KEY = "nasprune.sha256"
_CONSTRUCTOR_PREFIXES = ("torchvision.models.", "nasprune.models.")


class FormatError(ValueError):
    """The file is not a valid nasprune model file, or does not fit the given base model."""


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _digest(arch_json: str, tensors: dict) -> str:
    h = hashlib.sha256(arch_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(model: nn.Module, path, *, constructor: str | None = None, kwargs: dict | None = None) -> None:
    """Write ``model`` (slimmed by ``nasprune.slim.apply`` or not) to ``path``.

    constructor / kwargs: optional dotted name of a function under ``torchvision.models`` or
    ``nasprune.models`` that builds the base model (``"torchvision.models.resnet50"``), so that
    ``load(path)`` needs no base model. Without them, a model that knows its own constructor
    (a ``nasprune_constructor()`` method returning (constructor, kwargs), e.g.
    ``nasprune.models.TASResNet``) records that. The file is replaced atomically.
    """
    import nasprune

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    if constructor is None and callable(getattr(model, "nasprune_constructor", None)):
        constructor, kwargs = model.nasprune_constructor()
    if constructor is not None and not constructor.startswith(_CONSTRUCTOR_PREFIXES):
        raise ValueError(f"constructor must be under {' or '.join(_CONSTRUCTOR_PREFIXES)}, got {constructor!r}")
    record = getattr(model, "nasprune_slim", None) or {"base_class": _qualname(type(model)), "steps": []}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    arch = {
        "format": FORMAT,
        "nasprune_version": getattr(nasprune, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "base_class": record["base_class"],
        "constructor": constructor,
        "kwargs": kwargs or {},
        "steps": record["steps"],
    }
    try:
        arch_json = json.dumps(arch, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"constructor kwargs must be JSON-serialisable: {exc}") from exc
    metadata = {_ARCH_KEY: arch_json, _HASH_KEY: _digest(arch_json, tensors)}
    save_atomic(tensors, path, metadata)


def atomic_write(path, write) -> None:
    """Create or replace the file ``path`` atomically: ``write(tmp)`` writes the whole content to
    the path ``tmp`` (a new file beside ``path``, named ``.nasprune-*.tmp``), which is then synced
    to disk and moved into place with os.replace. A crash or an exception in ``write`` leaves
    either the old file or the new one, never a truncated one, and no temporary file behind.
    The folder is created when missing; the file gets the permissions a plain open() would give.
    Every file nasprune writes (model files, checkpoints, the data cache, the run folder) goes
    through here."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".nasprune-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(tensors: dict, path, metadata: dict) -> None:
    """Write a safetensors file with :func:`atomic_write`."""
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_architecture(path) -> dict:
    """The architecture JSON stored in a nasprune file (no weights are read)."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - every reader failure means a bad file
        raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt): {exc}") from exc
    if _ARCH_KEY not in metadata or _HASH_KEY not in metadata:
        raise FormatError(f"{path}: a safetensors file without nasprune architecture metadata; "
                          f"load plain weights with safetensors.torch.load_file")
    try:
        arch = json.loads(metadata[_ARCH_KEY])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: architecture metadata is not valid JSON ({exc})") from exc
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise FormatError(f"{path}: unknown format {arch.get('format') if isinstance(arch, dict) else arch!r}; "
                          f"this nasprune reads {FORMAT}")
    for key in ("base_class", "steps"):
        if key not in arch:
            raise FormatError(f"{path}: architecture metadata lacks {key!r}")
    arch["_json"], arch["_sha256"] = metadata[_ARCH_KEY], metadata[_HASH_KEY]
    return arch


def _build_base(arch: dict, path: str) -> nn.Module:
    name = arch.get("constructor")
    if not name:
        raise FormatError(f"{path} holds a slimmed {arch['base_class']} but records no constructor; "
                          f"pass base_model=<a fresh {arch['base_class'].rsplit('.', 1)[-1]}>")
    if not name.startswith(_CONSTRUCTOR_PREFIXES):
        raise FormatError(f"{path}: constructor {name!r} is outside {_CONSTRUCTOR_PREFIXES}; refusing to call it")
    module_name, _, fn_name = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise FormatError(f"{path}: constructor {name!r} not found ({exc})") from exc
    return fn(**arch.get("kwargs", {}))


def _dtype(name: str, path: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{path}: unknown input dtype {name!r}")
    return dtype


def load(path, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at ``path`` on a copy of ``base_model`` (an instance of the
    saved base class, e.g. a fresh ``torchvision.models.resnet50()``) and load its weights."""
    from safetensors.torch import load_file
    from nasprune.graph import trace
    from nasprune.slim import apply

    path = os.fspath(path)
    arch = read_architecture(path)
    if base_model is None:
        base_model = _build_base(arch, path)
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
    if _qualname(type(base_model)) != arch["base_class"]:
        raise FormatError(f"{path} holds a slimmed {arch['base_class']}, but base_model is a "
                          f"{_qualname(type(base_model))}")
    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{path}: weights unreadable (truncated or corrupt): {exc}") from exc
    if _digest(arch["_json"], tensors) != arch["_sha256"]:
        raise FormatError(f"{path}: checksum mismatch: the weights or the architecture were altered "
                          f"or damaged after saving")

    model = base_model
    for i, step in enumerate(arch["steps"]):
        untied = isinstance(step, dict) and bool(step.get("untie"))    # nasprune.graph.untie, replayed
        try:
            inputs = [torch.zeros(tuple(shape), dtype=_dtype(dtype, path)) for shape, dtype in step["inputs"]]
            leaves = list(step.get("leaf_modules", []))
            if not untied:
                keep = {int(g): torch.tensor(idx, dtype=torch.long) for g, idx in step["keep"].items()}
                exclude, mode = step.get("exclude", []), step.get("mode", "train")
                fingerprint = step["fingerprint"]
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: {'untie' if untied else 'slimming'} step {i} is malformed ({exc})") from exc
        if untied:
            from nasprune.graph.untie import untie
            model = untie(model, tuple(inputs), leaf_modules=leaves)
            continue
        graph = trace(model, tuple(inputs), exclude=exclude, leaf_modules=leaves, mode=mode)
        if graph.fingerprint != fingerprint:
            raise FormatError(f"{path}: base_model's channel groups differ from those the file was "
                              f"saved against (step {i}): a different architecture or configuration "
                              f"(e.g. num_classes) than the saved model's base")
        model = apply(model, graph, keep)
    if model is base_model:
        model = copy.deepcopy(base_model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "") \
            + (f" shape of {wrong[0]}: file {tuple(tensors[wrong[0]].shape)}, model "
               f"{tuple(expected[wrong[0]].shape)}" if wrong else "")
        raise FormatError(f"{path}: weights do not fit the rebuilt model:{detail}")
    model.load_state_dict(tensors, strict=True)
    return model
