"""On-device Gumbel top-k candidate sampling for TAS (methods.md 2.3 and 7.8).

TAS's `select2withP` perturbs the log-probabilities with Gumbel noise g, forms
p_hat = softmax((log p + g) / tau), copies p_hat to the host and draws k candidates from it with
torch.multinomial without replacement: a host synchronisation per layer per step. Here the draw is
Gumbel-top-k instead: the indices of the k largest log p_hat + g' (fresh Gumbel noise g') are
exactly an ordered sample without replacement from p_hat, and everything stays on the device. The
mixing weights are TAS's: softmax over the selected entries of (log p + g) / tau, differentiable
in the logits. Pure torch (a handful of tiny elementwise ops and a top-k); batch the logits of
many layers into one (..., M) tensor to sample them all at once.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise -log(E), E ~ Exp(1), shaped like `like` (fp32 or wider). E is clamped
    away from 0, so the noise is always finite (TAS retries its draw instead)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    e = torch.empty(like.shape, dtype=dtype, device=like.device).exponential_(generator=generator)
    return -torch.log(e.clamp_min_(torch.finfo(dtype).tiny))


def gumbel_topk(logits: Tensor, k: int, tau: float | Tensor, *,
                generator: torch.Generator | None = None,
                gumbel: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Samples k distinct candidates per row of `logits` (..., M) as TAS does, on the device.

    Returns (index, weights), both (..., k): `index` (int64, no gradient) is an ordered sample
    without replacement from p_hat = softmax((log_softmax(logits) + g) / tau), in draw order;
    `weights` = softmax over the selected entries of (log_softmax(logits) + g) / tau, which carries
    the gradient to `logits`. tau <= 0 (a Python number) turns the noise g off: p_hat =
    softmax(logits) and the weights are the renormalised probabilities of the selection.
    `gumbel` fixes g (shaped like logits) instead of drawing it; `generator` seeds both draws.
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape (..., M)")
    m = logits.shape[-1]
    if not 1 <= k <= m:
        raise ValueError(f"k must lie in [1, {m}] (the number of candidates), got {k}")
    logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                             else logits, dim=-1)
    if isinstance(tau, (int, float)) and tau <= 0:
        perturbed = logp
    else:
        g = gumbel_noise(logp, generator) if gumbel is None else gumbel.to(logp.dtype)
        perturbed = (logp + g) / tau
    with torch.no_grad():
        keys = torch.log_softmax(perturbed, dim=-1) + gumbel_noise(perturbed, generator)
        index = keys.topk(k, dim=-1).indices
    weights = torch.softmax(perturbed.gather(-1, index), dim=-1)
    return index, weights
