"""Run a function on N gloo ranks (spawned processes, one thread each) and collect each rank's
result, with every file a rank opened for writing under a watched folder (an audit hook)."""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as td
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, watched, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    writes = []
    watched = os.path.realpath(watched)

    def audit(event, hook_args):
        if event == "open" and isinstance(hook_args[0], (str, bytes, os.PathLike)):
            mode, flags = hook_args[1], hook_args[2] if len(hook_args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            path = os.path.realpath(os.fsdecode(hook_args[0]))
            if writing and path.startswith(watched):
                writes.append(path)
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
            for target in hook_args[:2] if event in ("os.rename", "os.replace") else hook_args[:1]:
                if isinstance(target, (str, bytes, os.PathLike)):
                    path = os.path.realpath(os.fsdecode(target))
                    if path.startswith(watched):
                        writes.append(path)
    sys.addaudithook(audit)
    td.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        try:
            out = fn(rank, *args)
        except KeyboardInterrupt:       # a kill the test asked for
            out = "killed"
        td.barrier()
    finally:
        td.destroy_process_group()
    torch.save({"result": out, "writes": sorted(set(writes))}, os.path.join(results, f"rank{rank}.pt"))


def run_ranks(fn, args=(), *, world_size=2, watched, results):
    """[(result, files written under ``watched``) of each rank]: ``fn(rank, *args)`` on
    ``world_size`` gloo ranks. ``fn`` must be importable (a module-level function)."""
    os.makedirs(results, exist_ok=True)
    mp.start_processes(_worker, args=(world_size, _free_port(), fn, args, str(watched), str(results)),
                       nprocs=world_size, start_method="spawn")
    outs = [torch.load(os.path.join(results, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    return [(o["result"], o["writes"]) for o in outs]
