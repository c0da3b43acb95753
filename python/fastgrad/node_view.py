"""What a lowering entry may read from one PyTorch node (``NodeView``), and how fastgrad reads
saved tensors: through saved-tensor hooks (whose unpacked value need not be what the producer
computed), from graphs fastgrad freed (PyTorch's own error), and the throwaway graphs built to
read something of PyTorch's whatever the caller's grad mode (``recording``).
"""
import contextlib
import math

import torch

from . import ir
from .ir import reshape


class Unsupported(Exception):
    pass


FREED = "fastgrad_freed"
# PyTorch's torch.autograd.grad, taken at import (engine.py and sweep.py call it too), so that
# patching torch.autograd.grad to fastgrad.grad cannot recurse
TORCH_GRAD = torch.autograd.grad


class NodeView:
    """What a lowering entry may read from one PyTorch node."""

    def __init__(self, fn, bind):
        self.fn, self._bind = fn, bind
        self.meta = fn._input_metadata
        self.edges = fn.next_functions

    def out_shape(self, j=0):
        return tuple(self.meta[j].shape)

    def out_dtype(self, j=0):
        return self.meta[j].dtype

    def raw(self, name):
        """A saved attribute."""
        try:
            return getattr(self.fn, name)
        except AttributeError:
            raise Unsupported(f"no attribute {name}") from None

    def scalar(self, name):
        v = self.raw(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v is None:
            if v is None:
                return None
            raise Unsupported(f"{name} is {type(v).__name__}")
        return v

    def finite(self, name):
        """A saved float that must be finite (an activation's or a loss's constant): with an
        inf or NaN one the compositions' discarded branches give NaN where PyTorch's kernels
        never compute them, so such a node falls back."""
        v = self.scalar(name)
        if v is None or not math.isfinite(v):
            raise Unsupported(f"{name} is {v}")
        return float(v)

    def tensor(self, name, k=None):
        """A saved tensor (``k``: item k of a saved list of tensors), raising PyTorch's own
        error if fastgrad already freed the graph."""
        if is_freed(self.fn):
            raise RuntimeError(freed_message())
        t = self.raw(name)
        raw = getattr(self.fn, "_raw" + name, None)
        if k is not None:
            if not isinstance(t, (list, tuple)) or k >= len(t):
                raise Unsupported(f"{name} is not a list of {k + 1} or more")
            t, raw = t[k], raw[k] if isinstance(raw, (list, tuple)) and k < len(raw) else None
        if not isinstance(t, torch.Tensor):
            raise Unsupported(f"{name} is not a tensor")
        leaf = self._bind(t)
        if raw is not None:
            note_hooks(self._bind, leaf.known, raw, t,
                       lambda: self.raw(name) if k is None else self.raw(name)[k])
        return leaf

    def in_meta(self, i):
        fn, k = self.edges[i]
        if fn is None:
            return None
        m = fn._input_metadata[k]
        return tuple(m.shape), m.dtype

    def x(self, i, saved=None):
        """The i-th input as a slot (what the derivative is taken with respect to)."""
        base = self.tensor(saved) if saved is not None else None
        meta = self.in_meta(i) if i < len(self.edges) else None
        if meta is None:
            if base is not None:
                meta = (base.shape, base.dtype)
                out = self.out_dtype()
                if base.shape == () and out in (torch.float32, torch.float64) and \
                        base.dtype.is_floating_point and ir.promote(base.dtype, out) != out:
                    # A 0-d value wider than the result (the 0.5 of `0.5 * s` for a float32
                    # s, which PyTorch saves as a 0-d float64 "wrapped number"): PyTorch
                    # computed with it converted to the result's dtype, and so does its
                    # backward, so fastgrad reads it so too (a float64 value would make the
                    # whole derivative compute in float64).
                    base = ir.cast(base, out)
                    meta = ((), out)
            else:  # a constant operand nobody saved: it only broadcasts against the output
                meta = (self.out_shape(), self.out_dtype())
        if base is not None and base.shape != meta[0]:
            base = reshape(base, meta[0])
        return ir.slot(i, base, meta[0], meta[1])

    def known(self, expr, saved, detached=False):
        """``expr`` bound to the saved tensor ``saved`` (``detached``: a tensor without a
        graph of its own, see ir.py)."""
        t = self.tensor(saved)
        if expr.op == "slot":
            # (a mean over dims of size 1 is its input: bound, the slot would become another
            # node, which the derivative with respect to the slot does not reach)
            return expr
        return ir.with_known(expr, t.known, detached) if t.shape == expr.shape or \
            ir.numel(t.shape) == ir.numel(expr.shape) else expr


def hooked(bind):
    """The numbers of the tensors ``bind`` read through saved-tensor hooks: the hook's unpacked
    value (an offloaded or compressed copy, say) is what PyTorch computes with, which need
    not be what the tensor's producer computed, so sweep._link_saved ties none of them."""
    d = bind.__dict__
    if "hooked" not in d:
        d["hooked"] = set()
    pending = d.pop("hooks_pending", None)
    if pending:  # (asked only where ties are made: unpacking again costs, and runs hooks)
        d["hooked"].update(k for k, raw, t, again in pending if through_hooks(raw, t, again))
    return d["hooked"]


def forget_pending(bind):
    """Drop the checks hooked() was not asked for (they hold nodes and tensors), at the end of
    a sweep."""
    bind.__dict__.pop("hooks_pending", None)


def note_hooks(bind, k, raw, t, again):
    """Note bound tensor k (SavedTensor ``raw``, unpacked as ``t``; ``again`` unpacks it once
    more) for hooked() to check (through_hooks)."""
    bind.__dict__.setdefault("hooks_pending", []).append((k, raw, t, again))


@contextlib.contextmanager
def recording():
    """PyTorch records a graph here whatever the caller's mode (no_grad, inference_mode): for
    the throwaway graphs fastgrad builds to read something of PyTorch's, which a call from
    inside such a mode may be the first to need."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


_SHOWS_HOOKS = []


def shows_saved_tensor_hooks():
    """Whether this PyTorch shows a saved tensor's unpack hook (where it does not, saved
    outputs are never tied: through_hooks)."""
    if not _SHOWS_HOOKS:
        with recording():
            y = torch.zeros(1, requires_grad=True).exp()
            _SHOWS_HOOKS.append(hasattr(y.grad_fn._raw_saved_result, "unpack_hook"))
    return _SHOWS_HOOKS[0]


def through_hooks(raw, t, again):
    """Whether saved tensor ``t`` (``raw``: its SavedTensor) may have come through saved-tensor
    hooks. Newer PyTorch releases show the unpack hook on it. Older ones (2.5) do not: there a
    tensor counts as hooked unless unpacking it again (``again()``) gives the very same tensor,
    as PyTorch does only for a saved input without hooks; a saved output is unpacked anew each
    time, so it counts too (loaded, never computed again)."""
    if hasattr(raw, "unpack_hook"):
        return raw.unpack_hook is not None
    return again() is not t


def is_freed(fn):
    try:
        return fn.metadata.get(FREED, False)
    except Exception:
        return False


_HOLDS_SAVED = {}


def holds_saved_tensors(fn):
    """Whether nodes of fn's class keep saved tensors (what a freed graph loses). PyTorch names a
    saved tensor `_raw_saved_<name>` besides `_saved_<name>`; saved scalars have no raw form.
    A Python Function's node may hold `saved_tensors`."""
    cls = type(fn)
    v = _HOLDS_SAVED.get(cls)
    if v is None:
        v = _HOLDS_SAVED[cls] = any(a.startswith("_raw_saved_") or a == "saved_tensors"
                                    for a in dir(fn))
    return v


def signed(d):
    # Some saved dims come back as unsigned 64-bit integers (-1 reads as 2**64 - 1).
    return d - (1 << 64) if d >= (1 << 63) else d


def saved_dim(v, name, nd):
    return signed(v.scalar(name)) % max(nd, 1)


def wrap_dims(v, dims, nd):
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if nd == 0:  # (dim 0 or -1 of a 0-dim tensor, as PyTorch allows: nothing to reduce)
        return ()
    return tuple(range(nd)) if len(dims) == 0 else tuple(signed(d) % nd for d in dims)


_FREED_MSG = []


def freed_message():
    """PyTorch's own text for a graph used after it was freed (read once from PyTorch)."""
    if not _FREED_MSG:
        with recording():
            x = torch.zeros(1, requires_grad=True)
            y = x.exp()
            TORCH_GRAD(y.sum(), x)
        try:
            y.grad_fn._saved_result
        except RuntimeError as e:
            _FREED_MSG.append(str(e))
        else:  # pragma: no cover - PyTorch always raises here
            _FREED_MSG.append("Trying to backward through the graph a second time")
    return _FREED_MSG[0]
