"""Elementwise losses as compositions of IR primitives (lowering.py reads their PyTorch nodes).

Each is written branch by branch as PyTorch's backward formula reads (``x < -delta``, ``x >
delta``, else), so NaN takes the branch PyTorch's does, and a branch the select discards sees x
only on its own side (no 0 * inf from a square at inf).
"""
import math

from . import ir
from .activations import opmath
from .ir import ew, mul, div, sub, where, neg, rsum

_REDUCTIONS = ("none", "mean", "sum")  # PyTorch's Reduction enum: 0, 1, 2


def reduce(e, reduction):
    """The elementwise loss ``e`` reduced as PyTorch's ``reduction`` (0, 1, 2) says."""
    how = _REDUCTIONS[reduction]
    if how == "none" or e.ndim == 0:  # (the mean of one value is itself)
        return e
    s = rsum(e, tuple(range(e.ndim)))
    return div(s, float(ir.numel(e.shape))) if how == "mean" else s


def mse(x, target, reduction):
    """(x - target)^2, reduced, as the composite ``mse`` of d = x - target (attrs: norm, 2 / N
    for the mean of N elements, else 2), whose rule is PyTorch's mse_loss_backward,
    (norm * d) * g (rules.RULES["mse"]): the product rule's g d + g d rounded, and overflowed,
    otherwise. For the mean its elementwise value is d^2 / N, summed. Computed in the dtype
    (PyTorch's kernel rounds 2 d in a half type before it multiplies)."""
    d = sub(x, target)
    mean = _REDUCTIONS[reduction] == "mean" and d.ndim > 0
    n = ir.numel(d.shape)
    e = ir.composite("mse", d, ((2.0 / n if n else math.inf) if mean else 2.0,))
    return rsum(e, tuple(range(e.ndim))) if mean else reduce(e, reduction)


def _piecewise(d, bound, outer, inner, k):
    """An even loss of d: outer(|d|) beyond +-bound, inner(d) = k d^2 / 2 between (and for
    NaN), with PyTorch's derivatives: the first k d g between the bounds, at them (k bound g)
    and at NaN; the second masked by |d| < bound, 0 at the bounds and at NaN, as PyTorch's
    double backward masks it. So inner reads d only where |d| < bound (``a``); at the bounds
    and at NaN it adds k (h d - h^2 / 2), h the value of d there held constant (``h``), whose
    derivative k h is the first one's value there and whose own derivative is 0; inside the
    bounds that term is not added at all (an infinite g would meet its k h = 0 there)."""
    low, high = ew("lt", d, -bound), ew("gt", d, bound)
    strict = ew("and", ew("gt", d, -bound), ew("lt", d, bound))
    a = where(strict, d, 0.0)
    h = where(ew("eq", d, bound), bound, where(ew("eq", d, -bound), -bound,
                                                where(ew("isnan", d), math.nan, 0.0)))
    held = mul(sub(mul(h, d), mul(mul(h, h), 0.5)), k)
    # (held only outside the bounds' interior, where h is 0: its derivative k h g would be
    # 0 * inf = NaN there for an infinite g, where PyTorch's k d g is +-inf)
    inside = inner(a)
    return where(low, outer(neg(d)), where(high, outer(d),
                                           where(strict, inside, ir.add(inside, held))))


@opmath
def huber(x, target, delta):
    """0.5 d^2 for |d| <= delta, delta * (|d| - delta / 2) beyond."""
    return _piecewise(sub(x, target), delta, lambda d: mul(sub(d, 0.5 * delta), delta),
                      lambda d: mul(mul(d, d), 0.5), 1.0)


@opmath
def smooth_l1(x, target, beta):
    """0.5 d^2 / beta for |d| <= beta, |d| - beta / 2 beyond (beta > 0)."""
    return _piecewise(sub(x, target), beta, lambda d: sub(d, 0.5 * beta),
                      lambda d: div(mul(mul(d, d), 0.5), beta), 1.0 / beta)


def nll_loss(x, target, weight, ignore_index, reduction, total_weight):
    """-x[..., target, ...] * weight[target] along the class dim (1, or 0 for one sample), 0
    where the target is ``ignore_index``; the mean divides by PyTorch's saved ``total_weight``
    (the weights summed over the targets kept). ``target`` and ``weight`` are bound tensors."""
    cdim = 1 if x.ndim >= 2 else 0
    keep = tuple(1 if i == cdim else s for i, s in enumerate(x.shape))
    t = ir.reshape(target, keep)
    pick = ew("and", ew("eq", ir.iota(x.shape, cdim, x.dtype), ir.expand(t, x.shape)),
              ir.expand(ew("ne", t, float(ignore_index)), x.shape))
    if weight is not None:
        x = mul(x, ir.expand(ir.reshape(weight, tuple(x.shape[cdim] if i == cdim else 1
                                                      for i in range(x.ndim))), x.shape))
    # (tied: PyTorch's gradient, constant in x, is computed from x and requires grad)
    e = ir.tie_grad(neg(ir.reshape(rsum(where(pick, x, 0.0), (cdim,)), target.shape)), x)
    if _REDUCTIONS[reduction] == "mean":
        return div(reduce(e, _REDUCTIONS.index("sum")), total_weight)
    return reduce(e, reduction)
