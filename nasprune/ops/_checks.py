"""Argument checks shared by every backend's entry point (the C++ kernels repeat them for callers
of torch.ops.nasprune.* directly). Errors name the argument, its shape and the expected value."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("identity", "relu")


def activations(name: str, z: Tensor) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(f"{name} must have shape (N, C, ...), got {tuple(z.shape)}")
    if z.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {z.dtype}")


def per_channel(name: str, p: Tensor, channels: int, z: Tensor) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(p).__name__}")
    if p.dim() != 1 or p.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},) to match the output channels, "
                         f"got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {p.dtype}")
    if p.device != z.device:
        raise RuntimeError(f"{name} is on {p.device} but z is on {z.device}")


def epilogue(z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor, act: str,
             out_index: Tensor | None) -> None:
    activations("z", z)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not isinstance(gate, Tensor) or gate.dim() != 1:
        raise ValueError(f"gate must be a 1-D tensor, got "
                         f"{tuple(gate.shape) if isinstance(gate, Tensor) else type(gate).__name__}")
    channels = gate.shape[0]
    for name, p in (("gate", gate), ("scale", scale), ("shift", shift)):
        per_channel(name, p, channels, z)
    if out_index is None:
        if z.shape[1] != channels:
            raise ValueError(f"z has {z.shape[1]} channels but gate has {channels} "
                             "(pass out_index to scatter fewer channels)")
    elif (out_index.dtype != torch.int64 or out_index.dim() != 1
          or out_index.shape[0] != z.shape[1]):
        raise ValueError(f"out_index must be an int64 vector of length {z.shape[1]} (z's "
                         f"channels), got {out_index.dtype} of shape {tuple(out_index.shape)}")
    elif out_index.device != z.device:
        raise RuntimeError(f"out_index is on {out_index.device} but z is on {z.device}")


def batch_stats(mean: Tensor | None, invstd: Tensor | None, channels: int, z: Tensor) -> None:
    if (mean is None) != (invstd is None):
        raise ValueError("mean and invstd must be given together (batch statistics of z) or not at all")
    for name, v in (("mean", mean), ("invstd", invstd)):
        if v is not None:
            per_channel(name, v, channels, z)
            if v.requires_grad:
                raise ValueError(f"{name} must not require grad: the backward already differentiates "
                                 "through the batch statistics (detach it)")


def gradient(dy: Tensor, z: Tensor, out_channels: int) -> None:
    activations("dy", dy)
    expected = (z.shape[0], out_channels) + tuple(z.shape[2:])
    if tuple(dy.shape) != expected:
        raise ValueError(f"dy must have shape {expected}, got {tuple(dy.shape)}")
    if dy.dtype != z.dtype:
        raise ValueError(f"dy has dtype {dy.dtype} but z has {z.dtype}")
    if dy.device != z.device:
        raise RuntimeError(f"dy is on {dy.device} but z is on {z.device}")


def memory_format(z: Tensor) -> torch.memory_format:
    """The layout the kernels write: channels_last when z is (only) channels_last, else NCHW."""
    if z.dim() == 4 and not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def width_aggregate(z: Tensor, scale: Tensor, shift: Tensor, widths: Tensor, weights: Tensor,
                    act: str) -> None:
    activations("z", z)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not isinstance(widths, Tensor) or widths.dtype != torch.int64 or widths.dim() != 1 \
            or widths.shape[0] < 1:
        raise ValueError("widths must be a non-empty int64 vector (one width per candidate), got "
                         + (f"{widths.dtype} of shape {tuple(widths.shape)}"
                            if isinstance(widths, Tensor) else type(widths).__name__))
    k, c = widths.shape[0], z.shape[1]
    for name, p in (("scale", scale), ("shift", shift)):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(p).__name__}")
        if tuple(p.shape) != (k, c):
            raise ValueError(f"{name} must have shape ({k}, {c}) (candidates, z's channels), "
                             f"got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {p.dtype}")
    if not isinstance(weights, Tensor) or tuple(weights.shape) != (k,):
        raise ValueError(f"weights must have shape ({k},) (one per candidate), got "
                         + (f"{tuple(weights.shape)}" if isinstance(weights, Tensor)
                            else type(weights).__name__))
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a floating tensor, got {weights.dtype}")
    for name, p in (("scale", scale), ("shift", shift), ("widths", widths), ("weights", weights)):
        if p.device != z.device:
            raise RuntimeError(f"{name} is on {p.device} but z is on {z.device}")


SCORE_KINDS = ("l1", "l2", "taylor")


def filter_scores(weights, grads, kind: str) -> None:
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors, got {type(weights).__name__}")
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"weights[{i}] must be a Tensor, got {type(w).__name__}")
        if w.dim() < 1:
            raise ValueError(f"weights[{i}] must have at least one dimension (filters along dim 0)")
        if w.dtype not in FLOAT_DTYPES:
            raise ValueError(f"weights[{i}] must be float32, float16 or bfloat16, got {w.dtype}")
        if w.dtype != weights[0].dtype:
            raise ValueError(f"weights[{i}] has dtype {w.dtype} but weights[0] has {weights[0].dtype}")
        if w.device != weights[0].device:
            raise RuntimeError(f"weights[{i}] is on {w.device} but weights[0] is on {weights[0].device}")
    if kind != "taylor":
        if grads:
            raise ValueError(f"grads are only used by kind 'taylor', got {len(grads)} for {kind!r}")
        return
    if grads is None or isinstance(grads, Tensor) or len(grads) != len(weights):
        n = "none" if grads is None else (type(grads).__name__ if isinstance(grads, Tensor) else len(grads))
        raise ValueError(f"kind 'taylor' needs one gradient per weight: got {n} for {len(weights)} weights")
    for i, (w, g) in enumerate(zip(weights, grads)):
        if not isinstance(g, Tensor):
            raise TypeError(f"grads[{i}] must be a Tensor, got {type(g).__name__}")
        if g.shape != w.shape:
            raise ValueError(f"grads[{i}] must have the shape of weights[{i}], {tuple(w.shape)}, "
                             f"got {tuple(g.shape)}")
        if g.dtype != w.dtype:
            raise ValueError(f"grads[{i}] has dtype {g.dtype} but weights[{i}] has {w.dtype}")
        if g.device != w.device:
            raise RuntimeError(f"grads[{i}] is on {g.device} but weights[{i}] is on {w.device}")
