"""Running under torchrun: the few facts the library needs about torch.distributed.

nasprune runs inside PyTorch's own distributed engine, never beside it: the process group is
torch.distributed's (the command line starts it from torchrun's environment, a user's script
starts its own), fine-tuning wraps the model in DistributedDataParallel, and a searcher's
optimisers average their gradients across ranks with ``torch.distributed.all_reduce`` just before
they step (a search freezes and unfreezes parameter subsets within a step, which
DistributedDataParallel does not allow). Every helper is a no-op in one process, or when no
process group is initialised, so a single process behaves exactly as it would without this module.

Conventions: every rank runs the same code on the same seeded randomness; data loaders shard each
global batch (:class:`nasprune.data.DeviceLoader`); only rank 0 writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as td


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes files, logs and draws progress (rank 0; the only one alone)."""
    return rank() == 0


def launched() -> bool:
    """True in a process torchrun started as one of several (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto") -> str:
    """Join torchrun's process group if this process is one of several and none is initialised
    yet: nccl on GPUs, gloo on CPUs. Returns the device this rank should use ("cuda:LOCAL_RANK"
    for a CUDA device without an index). One process: ``device`` unchanged ("auto" resolved)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not launched():
        return device
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    if not td.is_initialized():
        td.init_process_group("nccl" if on_cuda else "gloo")
    return device


def shard_bounds(length: int, part: int, parts: int) -> tuple[int, int]:
    """[start, stop) of part ``part`` of ``parts`` of a range of ``length`` items, as
    torch.tensor_split cuts it (the first ``length % parts`` parts one item longer)."""
    size, extra = divmod(length, parts)
    start = part * size + min(part, extra)
    return start, start + size + (part < extra)


def _reduce_device() -> torch.device:
    """Where a collective's buffer must live: the rank's CUDA device under nccl, else the CPU."""
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean_(tensors) -> None:
    """Average ``tensors`` (a list) across ranks in place, with one all_reduce of a flat buffer."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or not is_distributed():
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    device = _reduce_device()
    flat = _flatten_dense_tensors([t.detach().to(device) for t in tensors])
    td.all_reduce(flat)
    flat /= td.get_world_size()
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.detach().copy_(reduced)


def average_gradients_before_step(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` average its parameters' gradients across ranks just before every step
    (a step pre-hook; nothing happens in one process). Idempotent per optimizer."""
    if getattr(optimizer, "_nasprune_averages", False):
        return

    def hook(opt, args, kwargs):
        if is_distributed():
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            by_dtype: dict = {}
            for g in grads:
                by_dtype.setdefault(g.dtype, []).append(g)
            for same in by_dtype.values():
                all_reduce_mean_(same)
    optimizer.register_step_pre_hook(hook)
    optimizer._nasprune_averages = True


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module``."""
    if not is_distributed():
        return
    device = _reduce_device()
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.detach().to(device)
        td.broadcast(buf, src)
        if buf is not t:
            t.detach().copy_(buf)


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if is_distributed():
        td.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (pickled in memory, never on disk)."""
    if not is_distributed():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src)
    return box[0]


def mean_metrics(metrics: dict) -> dict:
    """A step's metrics averaged across ranks (one all_reduce; scalars only, others unchanged)."""
    if not is_distributed():
        return metrics
    keys = [k for k, v in metrics.items()
            if (isinstance(v, torch.Tensor) and v.numel() == 1) or (isinstance(v, (int, float)) and not isinstance(v, bool))]
    if not keys:
        return metrics
    dev = _reduce_device()
    values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).to(dev).reshape(()) for k in keys])
    td.all_reduce(values)
    values /= td.get_world_size()
    return {**metrics, **dict(zip(keys, values.unbind()))}


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` across ranks in place (one all_reduce); returned for chaining."""
    if is_distributed():
        buf = tensor.detach().to(_reduce_device())
        td.all_reduce(buf)
        if buf is not tensor:
            tensor.copy_(buf)
    return tensor
