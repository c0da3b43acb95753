"""Norms and moments in IR: the vector 1- and 2-norm, var, std, layer_norm and batch_norm
(lowering.py reads their PyTorch nodes' saved attributes and calls these). Values come in the reduction's keepdim
layout (the caller reshapes).

The 2-norm and var are composites with rules of their own (rules.py), PyTorch's backward
formulas, so their derivatives at every order are PyTorch's, down to the masked division by a
zero norm (whose second derivative is NaN) and the mean of x that var's formula reads. (Built
from primitives, var's derivative would also carry the deviations' sum, 0 only up to rounding:
NaN in a row holding an inf, where PyTorch's is inf.) std is the composite ``std_root`` of var,
whose rule is PyTorch's std_backward: a division by the std itself (its saved result, where
bound), 0 where it is 0, so that derivatives reach the std's output as PyTorch's do.
"""
import math

from . import ir
from .activations import opmath, up
from .ir import ew, mul, div, sub, expand, rsum

@opmath
def vector_norm(x, order, dims):
    """The 1- or 2-norm of x over ``dims`` (keepdim layout)."""
    if order == 1:
        return rsum(ew("abs", x), dims)
    return ir.composite("norm2", x, (tuple(dims),))


@opmath
def var(x, dims, correction, whole=False):
    """Sum of squared deviations from the mean over ``dims``, divided by N - correction.
    ``whole``: PyTorch's node reduced every element without being given dims, where its
    derivative differs once N - correction <= 0 (rules._var_rule)."""
    return ir.composite("var", x, (tuple(dims), correction, bool(whole)))


@opmath
def std(x, dims, correction, whole=False):
    """The square root of var, as the composite ``std_root``: PyTorch's std_backward divides
    by the std itself, 0 where it is 0 (rules._std_root_rule). Bound to PyTorch's saved std
    (lowering), the rule reads that tensor as PyTorch's formula does, so derivatives reach the
    std's output as PyTorch's do, and its zeros mask the derivative where this var is not
    exactly 0 (the mean of equal values rounded)."""
    return ir.composite("std_root", var(x, dims, correction, whole), ())


def layer_norm(x, k, weight, bias, known_mean, known_rstd):
    """(x - mean) * rstd * weight + bias over the last ``k`` dims; returns (out, mean, rstd),
    computed in float32 for half types as PyTorch does.
    ``known_mean`` / ``known_rstd`` bind the mean and rstd nodes to PyTorch's saved results.
    PyTorch does not save eps: rstd is rsqrt(var + eps), whose rule needs only its own value
    (the saved one), so eps is never read and stands here as NaN, which would show if it were."""
    dtype = x.dtype
    x, weight, bias = [None if t is None else up(t) for t in (x, weight, bias)]
    out, mean, rstd = _normalize(x, tuple(range(x.ndim - k, x.ndim)), ir.UNREAD, known_mean,
                                 known_rstd)
    if weight is not None:
        out = mul(out, weight)
    if bias is not None:
        out = ir.add(out, bias)
    return ir.cast(_one_backward_op(out, x, weight), dtype), mean, rstd


def _one_backward_op(out, *inputs):
    """``out`` with its cotangent tied to each of ``inputs`` (ir.tie_grad, absent): PyTorch
    differentiates layer_norm and batch_norm through one fused backward op, every result of
    which requires grad under create_graph when its input or weight does (the bias gradient
    too, which reads only the cotangent), while its derivative along an input it does not read
    is None. (Not tied to the bias, which PyTorch does not save: a tie would make lowering need
    its value.)"""
    for t in inputs:
        if t is not None:
            out = ir.tie_grad(out, t, absent=True)
    return out


def _normalize(x, dims, eps, known_mean, known_rstd):
    """((x - mean) * rstd, mean, rstd): the mean and biased variance over ``dims``, rstd =
    rsqrt(variance + eps), mean and rstd bound by ``known_mean`` / ``known_rstd`` (layer_norm's
    and batch_norm's in training)."""
    n = float(math.prod(x.shape[d] for d in dims))
    mean = known_mean(div(rsum(x, dims), n))
    d = sub(x, expand(mean, x.shape))
    rstd = known_rstd(ew("rsqrt", ir.add(div(rsum(mul(d, d), dims), n), eps)))
    return mul(d, expand(rstd, x.shape)), mean, rstd


def batch_norm(x, weight, bias, training, eps, known_mean, known_invstd, running_mean,
               running_var):
    """(x - mean) * invstd * weight + bias per channel (dim 1), computed in float32 for half
    types. Training: the batch's mean and biased variance over every other dim, bound to the
    mean and invstd PyTorch saved (as layer_norm's); evaluation: the running statistics
    (bound tensors, constants for the derivative)."""
    dtype = x.dtype
    x, weight, bias = [None if t is None else up(t) for t in (x, weight, bias)]
    cshape = tuple(s if i == 1 else 1 for i, s in enumerate(x.shape))
    per_channel = lambda t: expand(ir.reshape(up(t), cshape), x.shape)  # noqa: E731
    if training:
        out, _, _ = _normalize(x, tuple(i for i in range(x.ndim) if i != 1), eps, known_mean,
                               known_invstd)
    else:  # (linear in x: its gradient requires grad through _one_backward_op's tie alone)
        out = mul(sub(x, per_channel(running_mean)),
                  per_channel(ew("rsqrt", ir.add(running_var, eps))))
    if weight is not None:
        out = mul(out, per_channel(weight))
    if bias is not None:
        out = ir.add(out, per_channel(bias))
    return ir.cast(_one_backward_op(out, x, weight), dtype)
