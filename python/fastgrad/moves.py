"""Lowerings of the nodes that move elements without computing with them: select, slice,
transpose, cat and stack, split and unbind, indexing by a tensor (index, index_select,
index_add, index_put) and masked_fill. Entries of lowering.LOWER, each given a NodeView.
"""
import torch

from . import ir
from .ir import add, mul, reshape
from .node_view import Unsupported, saved_dim, signed


def select(v):
    x = v.x(0)
    d = saved_dim(v, "_saved_dim", x.ndim)
    i = signed(v.scalar("_saved_index")) % x.shape[d]
    return [reshape(ir.slice_(x, d, i, 1, 1), v.out_shape())]


def slice_(v):
    x = v.x(0)
    d = saved_dim(v, "_saved_dim", x.ndim)
    start, step = v.raw("_saved_start"), v.scalar("_saved_step")
    end = v.raw("_saved_end")
    if not isinstance(start, (int, type(None))) or not isinstance(end, (int, type(None))):
        raise Unsupported("symbolic slice bounds")
    start = None if start is None else signed(start)
    end = None if end is None else signed(end)
    r = range(x.shape[d])[slice(start, end, step)]
    start = r.start if len(r) else 0
    return [ir.slice_(x, d, start, step, len(r))]


def transpose(v):
    x = v.x(0)
    if x.ndim == 0:
        return [x]
    a, b = saved_dim(v, "_saved_dim0", x.ndim), saved_dim(v, "_saved_dim1", x.ndim)
    perm = list(range(x.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return [ir.permute(x, perm)]


def _index_tensor(v, name, k=None):
    """The saved index ``name`` (item ``k`` of a saved list) bound, checked before it is
    bound (a tensor the plans cannot read, a uint8 mask or an index on another device than the
    call's, would send the whole call to PyTorch): one 1-d int64 tensor on the output's
    device, else the node falls back."""
    t = v.raw(name)
    if k is not None:
        if not isinstance(t, (list, tuple)) or len(t) != 1:
            raise Unsupported("an index of more than one dim")
        t = t[k]
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64 or \
            t.device != v.meta[0].device:
        raise Unsupported("an index other than one 1-d int64 tensor on the output's device")
    return v.tensor(name, k)


def index(v):
    """x[index]: rows of the node's input 0 (not saved: its derivative needs only the index),
    PyTorch's indexing and index_put_ kernels."""
    return [ir.gather(v.x(0), _index_tensor(v, "_saved_indices", 0), "index")]


def index_select(v):
    if v.raw("_saved_dim") != 0:
        raise Unsupported("index_select along a dim other than 0")
    x = v.x(0)
    if x.ndim == 0:
        raise Unsupported("index_select of a 0-d tensor")
    return [ir.gather(x, _index_tensor(v, "_saved_index"), "select")]


def index_add(v):
    """self.index_add(0, index, source, alpha): self plus source (times alpha) added into the
    rows index (ir.scatter, gather's transpose)."""
    if v.raw("_saved_dim") != 0:
        raise Unsupported("index_add along a dim other than 0")
    index = _index_tensor(v, "_saved_index")
    src = v.x(1, "_saved_source")
    if src.ndim < 1:
        raise Unsupported("index_add of a 0-d source")
    alpha = float(v.scalar("_saved_alpha"))
    rows = ir.scatter(src if alpha == 1.0 else mul(src, alpha), index, v.out_shape()[0],
                      "select")
    return [add(v.x(0), rows)]


def index_put(v):
    """self.index_put((index,), values, accumulate=True): self plus values added into the rows
    index (ir.scatter of kind "index": PyTorch's index_put_ kernel; the node PyTorch records
    for x[index]'s backward under create_graph is one). Without accumulate (rows replaced, the
    last write winning) it falls back."""
    if v.raw("_saved_accumulate") is not True:
        raise Unsupported("index_put without accumulate")
    index = _index_tensor(v, "_saved_indices", 0)
    values = v.x(1)
    n = v.out_shape()[0]
    if values.shape != (index.shape[0],) + tuple(v.out_shape()[1:]):
        raise Unsupported("index_put of values broadcast to the rows")
    return [add(v.x(0), ir.scatter(values, index, n, "index"))]


def masked_fill(v, tensor_value):
    mask = v.tensor("_saved_mask")
    x = v.x(0)
    fill = v.x(1) if tensor_value else ir.UNREAD  # (a scalar value is not saved)
    return [ir.where(mask, fill, x)]


def cat(v, stack=False):
    out_shape, dt = v.out_shape(), v.out_dtype()
    d = signed(v.scalar("_saved_dim")) % max(len(out_shape), 1)
    # PyTorch records no size for an input without an edge (a PINN's `cat([x, t], 1)` with a
    # t that needs no gradient): stacked, it has the others' shape; concatenated, one such
    # input takes what the others leave of the output. It is a bare slot, never read: its
    # derivative is not wanted, and no other input's reads it (engine._vjp refuses a
    # derivative that reads a bare slot).
    known = [v.in_meta(i) for i in range(len(v.edges))]
    missing = [i for i, m in enumerate(known) if m is None]
    if missing and not stack:
        if len(missing) > 1:
            raise Unsupported("concatenated tensors without a gradient edge, more than one")
        if any(len(m[0]) != len(out_shape) for m in known if m is not None):
            raise Unsupported("cat of tensors of other ranks")
        rest = out_shape[d] - sum(m[0][d] for m in known if m is not None)
        if rest < 0:
            raise Unsupported("cat sizes")
    parts = []
    for i in range(len(v.edges)):
        if known[i] is not None:
            p = v.x(i)
        elif stack:
            p = ir.slot(i, None, out_shape[:d] + out_shape[d + 1:], dt)
        else:
            p = ir.slot(i, None, out_shape[:d] + (rest,) + out_shape[d + 1:], dt)
        parts.append(reshape(p, p.shape[:d] + (1,) + p.shape[d:]) if stack else p)
    if any(p.ndim != len(out_shape) for p in parts):
        raise Unsupported("cat of tensors of other ranks")
    out, start = None, 0
    for p in parts:  # the sum of each part placed into zeros at its offset
        e = ir.embed(ir.cast(p, dt), d, start, 1, out_shape[d])
        out = e if out is None else add(out, e)
        start += p.shape[d]
    if start != out_shape[d]:
        raise Unsupported("cat sizes")
    return [out]


def split(v, sizes=None):
    x = v.x(0)
    d = saved_dim(v, "_saved_dim", x.ndim)
    if sizes is None:  # split by a fixed size, the last part shorter
        k = v.scalar("_saved_split_size")
        sizes = [min(k, x.shape[d] - s) for s in range(0, x.shape[d], k)] if k else []
    outs, start = [], 0
    for s in sizes:
        outs.append(ir.slice_(x, d, start, 1, s))
        start += s
    return outs


def unbind(v):
    x = v.x(0)
    d = saved_dim(v, "_saved_dim", x.ndim)
    return [reshape(ir.slice_(x, d, i, 1, 1), v.out_shape(i)) for i in range(x.shape[d])]
