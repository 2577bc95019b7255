"""Handlers for layers without channel parameters, and for layers that cannot be pruned."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nasprune.handlers import fields
from nasprune.handlers.base import LayerHandler, register


@register
class PointwiseHandler(LayerHandler):
    """Activations, dropout, identity: each value depends on its own channel only."""
    keeps_shape = True
    types = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
             nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
             nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink,
             nn.Softshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
             nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)

    def trace(self, ctx, call):
        return call.fields[0]


@register
class SpatialHandler(LayerHandler):
    """Pooling, resizing and spatial padding: they work within each channel."""
    types = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d,
             nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
             nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
             nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
             nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
             nn.CircularPad2d, nn.CircularPad3d)

    def trace(self, ctx, call):
        m = call.module
        info = call.infos[0]
        name = type(m).__name__
        n = next((int(c) for c in "123" if c + "d" in name), len(info.shape) - 2)
        out = call.out[0] if isinstance(call.out, tuple) else call.out
        field = fields.spatial_field(ctx, call.fields[0], info, out, n, call.name)
        return (field, field) if isinstance(call.out, tuple) else field


@register
class FlattenHandler(LayerHandler):
    """nn.Flatten / nn.Unflatten: channels follow the elements (and fixed sizes tie them)."""
    types = (nn.Flatten, nn.Unflatten)

    def trace(self, ctx, call):
        m = call.module
        out = ctx.compact(fields.reshape_field(ctx.compact(call.fields[0]), call.infos[0].shape, call.out.shape))
        literal = set()
        if isinstance(m, nn.Unflatten) and isinstance(m.unflattened_size, (tuple, list)):
            dim = m.dim % len(call.infos[0].shape)
            literal = {dim + i for i, s in enumerate(m.unflattened_size) if isinstance(s, int) and s != -1}
        return fields.tie_literal(ctx, out, literal, call.name)


@register
class PixelShuffleHandler(LayerHandler):
    types = (nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)

    def trace(self, ctx, call):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        if isinstance(m, nn.ChannelShuffle):
            return fields.channel_shuffle_field(ctx, x, info, m.groups, call.name)
        nd = len(info.shape)
        atoms = ctx.channels(x, info.shape, nd - 3, call.name)
        if isinstance(m, nn.PixelShuffle):
            r2 = m.upscale_factor ** 2
            blocks = atoms.reshape(-1, r2)
            ctx.atoms.union(blocks[:, :1], blocks)
            return ctx.compact(ctx.along(blocks[:, 0], nd - 3, nd))
        return ctx.compact(ctx.along(np.repeat(atoms, m.downscale_factor ** 2), nd - 3, nd))


@register
class SoftmaxHandler(LayerHandler):
    types = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)

    def trace(self, ctx, call):
        m = call.module
        nd = len(call.infos[0].shape)
        dim = -3 if isinstance(m, nn.Softmax2d) else (m.dim if m.dim is not None else nd - 1)
        return fields.mixing_field(ctx, call.fields[0], dim, nd, call.name)


@register
class MultiheadAttentionHandler(LayerHandler):
    """nn.MultiheadAttention is kept whole: its embedding width is tied to the internal
    projections and the head split, so the channels around it are fixed. Counted as the four
    projections (TAS counts only convolutions and fully connected layers)."""
    types = (nn.MultiheadAttention,)
    counts = True

    def trace(self, ctx, call):
        reason = f"nn.MultiheadAttention {call.name} keeps its embedding width"
        for f in list(call.fields) + list(call.kwfields.values()):
            if isinstance(f, torch.Tensor):
                ctx.block_field(f, reason)
        return fields.constant_like(ctx, call.out, reason)

    def macs(self, m, in_width, out_width, in_shape, out_shape):
        length = in_shape[-2] if (m.batch_first or len(in_shape) == 2) else in_shape[0]
        e = m.embed_dim
        return length * (e * e + m.kdim * e + m.vdim * e + e * e)

