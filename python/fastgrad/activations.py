"""Activation functions as compositions of IR primitives.

Each function takes the activation's input as IR (and its scalar parameters) and returns its
value as IR, built so that the derivative rules of the primitives (rules.py) give PyTorch's
derivative at every order, including at the kinks, on NaN and where a branch the result
discards would overflow. Where PyTorch's derivative reads the input but is constant on each
piece, the value is wrapped in ``ir.tie_grad`` so that the gradient requires grad as PyTorch's
does. lowering.py reads each PyTorch node's saved attributes and calls
these; no activation needs a VM opcode of its own except erf.

PyTorch computes these activations for float16 / bfloat16 in float32 and rounds once, so each
one is wrapped in ``_opmath``: the IR casts up, computes, and casts back.
"""
import math

import torch

from . import ir
from .ir import ew, add, mul, div, sub, neg, where

_OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _opmath(f):
    def wrapped(x, *params):
        return ir.cast(f(ir.cast(x, _OPMATH.get(x.dtype, x.dtype)), *params), x.dtype)
    wrapped.__name__, wrapped.__doc__ = f.__name__, f.__doc__
    return wrapped


@_opmath
def softplus(x, beta, threshold):
    """x where x*beta > threshold, else log1p(exp(x*beta))/beta. The exp's argument is capped at
    the threshold so the branch `where` discards cannot overflow to inf, whose zero cotangent
    would otherwise turn into NaN (0 * inf) in the derivative."""
    bx = mul(x, beta)
    over = ew("gt", bx, threshold)
    soft = div(ew("log1p", ew("exp", where(over, threshold, bx))), beta)
    return where(over, x, soft)


@_opmath
def leaky_relu(x, slope):
    """x > 0 ? x : x * slope (NaN takes the slope, as PyTorch's backward does)."""
    return ir.tie_grad(where(ew("gt", x, 0.0), x, mul(x, slope)), x)


@_opmath
def elu(x, alpha, scale, input_scale):
    """ELU, and SELU / CELU through their parameters: x <= 0 ? alpha*scale*expm1(x*input_scale)
    : x*scale. The test is `x <= 0` as in PyTorch, so NaN takes the linear branch's derivative;
    expm1 sees only x <= 0 (else 0), so the discarded branch never overflows."""
    neg_side = ew("le", x, 0.0)
    e = ew("expm1", mul(where(neg_side, x, 0.0), input_scale))
    return where(neg_side, mul(e, alpha * scale), mul(x, scale))


@_opmath
def gelu(x):
    """x * Phi(x) = x/2 * (1 + erf(x / sqrt(2)))."""
    return mul(mul(x, 0.5), add(ew("erf", mul(x, math.sqrt(0.5))), 1.0))


@_opmath
def gelu_tanh(x):
    """GELU's tanh approximation: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    inner = mul(add(x, mul(mul(mul(x, x), x), 0.044715)), math.sqrt(2.0 / math.pi))
    return mul(mul(x, 0.5), add(ew("tanh", inner), 1.0))


@_opmath
def silu(x):
    return mul(x, ew("sigmoid", x))


@_opmath
def mish(x):
    """x * tanh(softplus(x)), with softplus's threshold (20) keeping exp finite."""
    return mul(x, ew("tanh", softplus(x, 1.0, 20.0)))


@_opmath
def log_sigmoid(x):
    """min(x, 0) - log1p(exp(-|x|)). min's tie at 0 shares the cotangent and |x|'s derivative
    there is 0, which gives PyTorch's 1/2 at x = 0."""
    return sub(ew("min", x, 0.0), ew("log1p", ew("exp", neg(ew("abs", x)))))


@_opmath
def hardtanh(x, lo, hi):
    """clamp(x, lo, hi) with PyTorch's derivative mask: zero where x <= lo or x >= hi (the
    bounds excluded, unlike clamp's), and NaN passing the gradient through."""
    low, high = ew("le", x, lo), ew("ge", x, hi)
    return ir.tie_grad(where(ew("or", low, high), where(low, lo, hi), x), x)


@_opmath
def hardswish(x):
    """x * clamp(x + 3, 0, 6) / 6, by branch so that each branch's derivative is PyTorch's:
    0 up to -3, x/3 + 1/2 strictly between -3 and 3, 1 from 3 up. (NaN takes the last
    branch, as PyTorch's scalar loop does; its vectorised loop gives NaN.)"""
    mid = div(mul(x, add(x, 3.0)), 6.0)
    top = div(mul(x, 6.0), 6.0)
    return where(ew("le", x, -3.0), mul(x, 0.0), where(ew("lt", x, 3.0), mid, top))
