"""Channel rules for the functional ops of a traced graph (and for stateless layers).

Each rule receives the channel fields of an op's inputs and returns the field of its output,
uniting atoms that must be removed together and blocking channels an op cannot lose (a fixed
reshape size, a reduction across channels). Shape-moving ops run the same torch call on the
fields themselves, so their index bookkeeping is torch's own.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from nasprune.graph.context import TraceContext
from nasprune.handlers.fields import (TensorInfo, channel_shuffle_field, constant_like, mixing_field,
                                     reshape_field, spatial_field, tie_literal)


class OpView:
    """A call_function / call_method node with its recorded inputs, for the rules."""

    def __init__(self, ctx: TraceContext, node: fx.Node, field_of, info_of, source_of=None):
        self.ctx, self.node = ctx, node
        self.where = f"{node.name} ({_target_name(node)})"
        self._field_of, self._info_of = field_of, info_of
        self._source_of = source_of or (lambda n: None)
        self.out = info_of(node)

    def peek(self, arg):
        """The field if it exists already: a parameter that only meets an op which blocks it
        never needs atoms of its own."""
        return self._field_of(arg, create=False) if isinstance(arg, fx.Node) else None

    def source(self, arg):
        """(tensor node, dim) whose size an int argument was read from, if known."""
        return self._source_of(arg) if isinstance(arg, fx.Node) else None

    def field(self, arg):
        return self._field_of(arg) if isinstance(arg, fx.Node) else None

    def info(self, arg):
        return self._info_of(arg) if isinstance(arg, fx.Node) else arg

    def value(self, arg):
        """Concrete value of an argument: recorded for nodes, literal otherwise."""
        return fx.node.map_aggregate(arg, lambda a: self._info_of(a) if isinstance(a, fx.Node) else a)

    def arg(self, index: int, name: str, default=None):
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def tensor_nodes(self) -> list[fx.Node]:
        found = []
        fx.node.map_arg((self.node.args, self.node.kwargs),
                        lambda n: found.append(n) if isinstance(self._info_of(n), TensorInfo) else None)
        return found


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


# ---------------------------------------------------------------- shared pieces


def block_op(ctx: TraceContext, op: OpView, reason: str):
    for n in op.tensor_nodes():
        f = op.peek(n)
        if isinstance(f, torch.Tensor):
            ctx.block_field(f, reason)
    ctx.notes.append((op.where, reason))
    return constant_like(ctx, op.out, reason)


def elementwise(ctx: TraceContext, operands, out_shape, where: str):
    """Broadcasting pointwise op: operands that span the varying dims share their channels.

    ``operands`` are (field, shape) pairs. An operand broadcast along a channel dimension
    (a spatial mask of shape N,1,H,W) is not coupled: removing a channel does not touch it.
    """
    nd = len(out_shape)
    aligned = []
    for f, shape in operands:
        pad = nd - f.dim()
        aligned.append((f.view((1,) * pad + tuple(f.shape)), (1,) * pad + tuple(shape)))
    varying = sorted({d for f, _ in aligned for d in ctx.varying(f)})
    coupled, loose = [], []
    for f, shape in aligned:
        (coupled if all(shape[d] == out_shape[d] for d in varying) else loose).append(f)
    for f in loose:
        if set(ctx.varying(f)) & set(varying):
            reason = f"outer-product broadcast across channels at {where}"
            for g, _ in aligned:
                ctx.block_field(g, reason)
            ctx.notes.append((where, reason))
            return ctx.constant(nd, reason)
    base = max(coupled, key=lambda f: f.numel())  # keep the channel identity, not a constant
    for f in coupled:
        if f is not base:
            ctx.unify(base, f)
    return ctx.compact(torch.broadcast_tensors(base, *coupled)[0])


def pointwise(ctx: TraceContext, op: OpView):
    operands = [(op.field(n), op.info(n).shape) for n in op.tensor_nodes()]
    if not operands:
        return constant_like(ctx, op.out, f"tensor created at {op.where}")
    return elementwise(ctx, operands, op.out.shape, op.where)


def passthrough(ctx: TraceContext, op: OpView):
    return op.field(op.node.args[0])


# ------------------------------------------------------------------- the rules
def _apply_same(op: OpView):
    """Run the node's own torch call with channel fields in place of its tensors (expanded
    views: nothing is copied unless the op itself copies)."""
    def sub(a):
        if isinstance(a, fx.Node):
            info = op.info(a)
            if isinstance(info, TensorInfo):
                return op.field(a).expand(info.shape)
            return info
        return a
    args = fx.node.map_aggregate(op.node.args, sub)
    kwargs = fx.node.map_aggregate(op.node.kwargs, sub)
    if op.node.op == "call_method":
        return getattr(args[0], op.node.target)(*args[1:], **kwargs)
    return op.node.target(*args, **kwargs)


def _compact_tree(ctx, value):
    if isinstance(value, torch.Tensor):
        return ctx.compact(value)
    if isinstance(value, (list, tuple)):
        return tuple(_compact_tree(ctx, v) for v in value)
    return None


def movement(ctx, op):
    """permute / transpose / squeeze / expand / repeat / flip: channels follow the elements."""
    return _compact_tree(ctx, _apply_same(op))


def _follow_size(ctx, op, out, d, src):
    """Output dim ``d`` is sized from another tensor's dim: if that dim carries other channels,
    both must shrink alike (an attention output reshaped to the width of its input)."""
    node, k = src
    info = op.info(node)
    field = op.field(node)
    if not isinstance(field, torch.Tensor) or not isinstance(info, TensorInfo):
        return out
    k %= len(info.shape)
    if field.shape[k] == 1 or out.shape[d] == 1 and info.shape[k] == 1:
        return out
    theirs = ctx.channels(ctx.compact(field), info.shape, k, op.where)
    mine = ctx.channels(out, op.out.shape, d, op.where)
    if len(theirs) == len(mine) and set(ctx.atoms.find(theirs).tolist()) != set(ctx.atoms.find(mine).tolist()):
        ctx.unify(torch.from_numpy(theirs), torch.from_numpy(np.unique(ctx.atoms.find(mine)))
                  if len(set(ctx.atoms.find(mine).tolist())) == 1 else torch.from_numpy(mine))
        return ctx.compact(out)
    return out


def _is_literal(a) -> bool:
    return isinstance(a, int) and not isinstance(a, bool) and a != -1


def reshape(ctx, op):
    x = op.node.args[0]
    out = ctx.compact(reshape_field(ctx.compact(op.field(x)), op.info(x).shape, op.out.shape))
    name = op.node.target if op.node.op == "call_method" else getattr(op.node.target, "__name__", "")
    literal = set()
    if name in ("view", "reshape"):
        shape = op.node.args[1:] if op.node.op == "call_method" else op.node.args[1:2]
        if "shape" in op.node.kwargs or "size" in op.node.kwargs:
            shape = (op.node.kwargs.get("shape", op.node.kwargs.get("size")),)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        elif len(shape) == 1 and isinstance(op.source(shape[0]), list):
            shape = [("size-of", s) for s in op.source(shape[0])]
        if len(shape) == out.dim():
            literal = {d for d, a in enumerate(shape) if _is_literal(a)}
            for d, a in enumerate(shape):
                src = a[1] if isinstance(a, tuple) and a[:1] == ("size-of",) else op.source(a)
                if isinstance(src, tuple):
                    out = _follow_size(ctx, op, out, d, src)
    elif name == "unflatten":
        dim = op.arg(1, "dim")
        sizes = op.arg(2, "sizes")
        nd_in = len(op.info(op.node.args[0]).shape)
        dim %= nd_in
        if isinstance(sizes, (tuple, list)):
            literal = {dim + i for i, a in enumerate(sizes) if _is_literal(a)}
    return tie_literal(ctx, out, literal, op.where)


def cat(ctx, op):
    tensors = op.arg(0, "tensors")
    dim = op.arg(1, "dim", 0)
    nodes = [t for t in tensors if isinstance(t, fx.Node)]
    infos = [op.info(t) for t in nodes]
    nd = len(infos[0].shape)
    dim %= nd
    fields = [ctx.compact(op.field(t)) for t in nodes]
    varying = set().union(*[set(ctx.varying(f)) for f in fields])
    other = varying - {dim}
    if not other:  # a channel concatenation: positions simply follow each other
        parts = [f.expand(*[i.shape[d] if d == dim else f.shape[d] for d in range(nd)])
                 for f, i in zip(fields, infos)]
        return ctx.compact(torch.cat(parts, dim))
    if len(other) == 1:  # a concatenation along another dim: channels must shrink alike
        reduced = []
        for f in fields:
            if f.shape[dim] > 1:
                ctx.unify(f.narrow(dim, 0, 1), f)
                f = ctx.compact(f.narrow(dim, 0, 1))
            reduced.append(f)
        for f in reduced[1:]:
            ctx.unify(reduced[0], f)
        return ctx.compact(reduced[0])
    return block_op(ctx, op, f"concatenation of tensors with channels in several dims at {op.where}")


def stack(ctx, op):
    tensors = [t for t in op.arg(0, "tensors") if isinstance(t, fx.Node)]
    dim = op.arg(1, "dim", 0)
    fields = [op.field(t) for t in tensors]
    for f in fields[1:]:
        ctx.unify(fields[0], f)
    nd = len(op.out.shape)
    return ctx.compact(fields[0]).unsqueeze(dim % nd)


def split(ctx, op):
    """split / chunk / tensor_split / unbind. Equal chunks are fine (their sizes are computed
    at run time) once position j of every chunk is tied; fixed sizes are not."""
    x = op.node.args[0]
    info = op.info(x)
    f = ctx.compact(op.field(x))
    name = op.node.target if op.node.op == "call_method" else op.node.target.__name__
    if name == "unbind":
        dim = op.arg(1, "dim", 0)
    else:
        dim = op.arg(2, "dim", 0)
    dim %= len(info.shape)
    if dim in ctx.varying(f):
        chunks = op.value(op.arg(1, "chunks"))
        size = info.shape[dim]
        if name == "chunk" and isinstance(chunks, int) and size % chunks == 0 and size // chunks >= 1:
            atoms = ctx.channels(f, info.shape, dim, op.where)
            ctx.tie(atoms, chunks)
        else:
            reason = f"{name} with fixed sizes along channels at {op.where}"
            ctx.block_field(f, reason)
            ctx.notes.append((op.where, reason))
    return _compact_tree(ctx, _apply_same(op))


def getitem(ctx, op):
    src, index = op.node.args
    src_field = op.field(src)
    if not isinstance(src_field, torch.Tensor):  # indexing a tuple of outputs
        if src_field is None:
            return None
        return src_field[op.value(index)]
    info = op.info(src)
    f = ctx.compact(src_field)
    nd = len(info.shape)
    items = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    new_index, d, bad = [], 0, False
    for it in items:
        if it is None:
            new_index.append(None)
            continue
        if it is Ellipsis:
            skip = nd - consumed
            new_index.extend([slice(None)] * skip)
            d += skip
            continue
        value = op.value(it)
        varying = f.shape[d] > 1
        if isinstance(value, slice):
            full_slice = slice(*slice(value.start, value.stop, value.step).indices(info.shape[d])) \
                == slice(0, info.shape[d], 1)
            if varying and not full_slice:
                bad = True
            new_index.append(slice(None) if (varying or f.shape[d] == 1) else value)
        elif isinstance(value, TensorInfo):
            bad |= varying
            new_index.append(torch.zeros(value.shape, dtype=torch.long))
        else:  # an int or a list of ints
            bad |= varying
            new_index.append(0 if isinstance(value, int) else torch.zeros(len(value), dtype=torch.long))
        d += 1
    if bad:
        return block_op(ctx, op, f"indexing channels with fixed positions at {op.where}")
    out = f[tuple(new_index)]
    return ctx.compact(out)


def pad(ctx, op):
    x = op.node.args[0]
    info = op.info(x)
    amounts = op.value(op.arg(1, "pad"))
    mode = op.arg(2, "mode", "constant")
    value = op.arg(3, "value", None)
    f = ctx.compact(op.field(x))
    nd = len(info.shape)
    padded = {nd - 1 - i // 2 for i, a in enumerate(amounts) if a}
    hit = padded & set(ctx.varying(f))
    if not hit:
        return f
    if mode != "constant" or (value not in (None, 0, 0.0)) or len(hit) > 1:
        return block_op(ctx, op, f"padding across channels at {op.where}")
    d = hit.pop()
    before, after = amounts[2 * (nd - 1 - d)], amounts[2 * (nd - 1 - d) + 1]
    reason = f"channel padding of fixed size at {op.where}"
    atoms = ctx.channels(f, info.shape, d, op.where)
    if before < 0 or after < 0:
        return block_op(ctx, op, reason)
    extra_b, extra_a = ctx.atoms.new(before, blocked=reason), ctx.atoms.new(after, blocked=reason)
    ctx.block_field(f, reason)  # the literal amounts fix where the data sits
    return ctx.along(np.concatenate([extra_b, atoms, extra_a]), d, nd)


def roll(ctx, op):
    x = op.node.args[0]
    f = ctx.compact(op.field(x))
    nd = len(op.info(x).shape)
    dims = op.value(op.arg(2, "dims", None))
    dims = range(nd) if dims is None else ([dims] if isinstance(dims, int) else dims)
    if {d % nd for d in dims} & set(ctx.varying(f)):
        return block_op(ctx, op, f"roll along channels at {op.where}")
    return f


def reduction(ctx, op):
    x = op.node.args[0]
    info = op.info(x)
    second = op.arg(1, "dim", None)
    if isinstance(op.info(second), TensorInfo):  # torch.max(a, b): pointwise
        return pointwise(ctx, op)
    f = ctx.compact(op.field(x))
    nd = len(info.shape)
    dims = op.value(second)
    keepdim = bool(op.value(op.arg(2, "keepdim", False)))
    dims = list(range(nd)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    dims = {d % nd for d in dims} if nd else set()
    if dims & set(ctx.varying(f)):
        return block_op(ctx, op, f"reduction across channels at {op.where}")
    out = f if keepdim else f.reshape([s for d, s in enumerate(f.shape) if d not in dims])
    if isinstance(op.out, tuple):  # max/min with dim: (values, indices)
        return tuple(out for _ in op.out)
    return out


def softmax(ctx, op):
    x = op.node.args[0]
    nd = len(op.info(x).shape)
    dim = op.value(op.arg(1, "dim"))
    return mixing_field(ctx, op.field(x), dim if dim is not None else nd - 1, nd, op.where)


def _spatial(n_spatial):
    def rule(ctx, op):
        x = op.node.args[0]
        info = op.info(x)
        n = n_spatial if n_spatial else len(info.shape) - 2
        out = op.out[0] if isinstance(op.out, tuple) else op.out
        field = spatial_field(ctx, op.field(x), info, out, n, op.where)
        return (field, field) if isinstance(op.out, tuple) else field
    return rule


def pixel_shuffle(ctx, op):
    x = op.node.args[0]
    info = op.info(x)
    r = op.value(op.arg(1, "upscale_factor"))
    nd = len(info.shape)
    atoms = ctx.channels(op.field(x), info.shape, nd - 3, op.where)
    blocks = atoms.reshape(-1, r * r)
    ctx.atoms.union(blocks[:, :1], blocks)  # r*r input channels make one output channel
    return ctx.compact(ctx.along(blocks[:, 0], nd - 3, nd))


def pixel_unshuffle(ctx, op):
    x = op.node.args[0]
    info = op.info(x)
    r = op.value(op.arg(1, "downscale_factor"))
    nd = len(info.shape)
    atoms = ctx.channels(op.field(x), info.shape, nd - 3, op.where)
    return ctx.compact(ctx.along(np.repeat(atoms, r * r), nd - 3, nd))


def channel_shuffle(ctx, op):
    x = op.node.args[0]
    return channel_shuffle_field(ctx, op.field(x), op.info(x), op.value(op.arg(1, "groups")), op.where)


def creation(ctx, op):
    return constant_like(ctx, op.out, f"tensor of fixed size created at {op.where}")


def no_field(ctx, op):
    return None


# ------------------------------------------------------------------ rule table
_POINTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.pos, operator.abs, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.and_, operator.or_, operator.xor, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.fmax, torch.fmin, torch.pow, torch.where,
    torch.lerp, torch.addcmul, torch.addcdiv, torch.clamp, torch.clip, torch.relu, torch.relu_,
    torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt, torch.rsqrt,
    torch.erf, torch.sin, torch.cos, torch.square, torch.reciprocal, torch.sign, torch.floor,
    torch.ceil, torch.round, torch.nan_to_num, torch.masked_fill, torch.bernoulli, torch.dropout,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.eq, torch.ne, torch.lt, torch.gt, torch.le, torch.ge, torch.logical_and,
    torch.logical_or, torch.logical_not, torch.isnan, torch.isfinite,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.tanhshrink, F.sigmoid, F.tanh,
    F.logsigmoid, F.threshold, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout,
]
_POINTWISE_METHODS = """add add_ sub sub_ mul mul_ div div_ true_divide pow pow_ neg abs sqrt rsqrt exp
log sigmoid sigmoid_ tanh tanh_ relu relu_ clamp clamp_ clamp_min clamp_max clip maximum minimum
where masked_fill masked_fill_ square reciprocal sign floor ceil round lerp addcmul addcdiv eq ne lt
le gt ge erf sin cos bernoulli fill_ zero_ __and__ __or__""".split()
_PASS_METHODS = """to type type_as float double half bfloat16 cpu cuda contiguous clone detach
detach_ requires_grad_ pin_memory""".split()
_MOVE_METHODS = "permute transpose swapaxes movedim moveaxis squeeze unsqueeze expand expand_as repeat tile flip t".split()
_MOVE_FUNCS = [torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.moveaxis,
               torch.squeeze, torch.unsqueeze, torch.tile, torch.flip, torch.t]
_RESHAPE = [torch.reshape, torch.flatten, torch.unflatten, "view", "reshape", "flatten",
            "unflatten", "view_as", "reshape_as"]
_REDUCE_FUNCS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std,
                 torch.var, torch.prod, torch.logsumexp]
_REDUCE_METHODS = "mean sum amax amin max min std var prod logsumexp".split()
_CREATE = [torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.rand, torch.randn,
           torch.eye, torch.linspace, torch.tensor, "new_zeros", "new_ones", "new_full", "new_empty",
           "new_tensor"]
_NO_FIELD = [torch._assert, getattr, len, "size", "dim", "numel", "nelement", "__len__"]

RULES: dict = {}
for _t in _POINTWISE_FUNCS + _POINTWISE_METHODS:
    RULES[_t] = pointwise
for _t in _PASS_METHODS:
    RULES[_t] = passthrough
for _t in _MOVE_FUNCS + _MOVE_METHODS:
    RULES[_t] = movement
for _t in _RESHAPE:
    RULES[_t] = reshape
for _t in _REDUCE_FUNCS + _REDUCE_METHODS:
    RULES[_t] = reduction
for _t in _CREATE:
    RULES[_t] = creation
for _t in _NO_FIELD:
    RULES[_t] = no_field
for _t in (torch.cat, torch.concat, torch.concatenate):
    RULES[_t] = cat
RULES[torch.stack] = stack
for _t in (torch.split, torch.chunk, torch.tensor_split, torch.unbind, "split", "chunk",
           "tensor_split", "unbind"):
    RULES[_t] = split
RULES[operator.getitem] = getitem
RULES[F.pad] = pad
RULES[torch.roll] = RULES["roll"] = roll
for _t in (F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, "softmax", "log_softmax"):
    RULES[_t] = softmax
for _n, _fs in ((1, [F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                     F.lp_pool1d, torch.max_pool1d, torch.avg_pool1d, torch.adaptive_avg_pool1d]),
                (2, [F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                     F.lp_pool2d, torch.max_pool2d]),
                (3, [F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d]),
                (0, [F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear])):
    for _f in _fs:
        RULES[_f] = _spatial(_n)
for _t in (F.pixel_shuffle, torch.pixel_shuffle):
    RULES[_t] = pixel_shuffle
for _t in (F.pixel_unshuffle, torch.pixel_unshuffle):
    RULES[_t] = pixel_unshuffle
for _t in (F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle):
    RULES[_t] = channel_shuffle

try:  # torchvision wraps these for fx; they act within each channel
    from torchvision.ops import stochastic_depth as _sd
    RULES[_sd] = pointwise
except ImportError:  # pragma: no cover - torchvision is optional
    pass


def apply(ctx: TraceContext, op: OpView):
    node = op.node
    key = node.target
    rule = RULES.get(key)
    if rule is None and node.op == "call_function" and key is getattr:
        rule = no_field
    if rule is None:
        if not op.tensor_nodes():
            return None if not _has_tensor(op.out) else creation(ctx, op)
        if node.op == "call_function" and key is getattr:
            return movement(ctx, op)
        return block_op(ctx, op, f"unsupported op {op.where}")
    if rule is no_field and _has_tensor(op.out):  # e.g. x.T, x.mT through getattr
        return movement(ctx, op) if op.tensor_nodes() else creation(ctx, op)
    return rule(ctx, op)


def _has_tensor(out) -> bool:
    if isinstance(out, TensorInfo):
        return True
    if isinstance(out, (list, tuple)):
        return any(_has_tensor(o) for o in out)
    if isinstance(out, dict):
        return any(_has_tensor(o) for o in out.values())
    return False
