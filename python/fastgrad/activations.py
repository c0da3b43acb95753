"""Activation functions as compositions of IR primitives.

Each function takes the activation's input as IR (and its scalar parameters) and returns its
value as IR, built so that the derivative rules of the primitives (rules.py) give PyTorch's
derivative at every order, including at the kinks, on NaN and where a branch the result
discards would overflow. Where PyTorch's derivative reads the input but is constant on each
piece, the value is wrapped in ``ir.tie_grad`` so that the gradient requires grad as PyTorch's
does. lowering.py reads each PyTorch node's saved attributes and calls these; none needs a VM
opcode of its own except gelu's erf.

PyTorch computes these activations for float16 / bfloat16 in float32 and rounds once, so each
one is wrapped in ``opmath``: the IR casts up, computes, and casts back.

The ``*_backward`` functions, each beside its activation, are PyTorch's kernels for the
activation's backward, which PyTorch records as a node of its own under create_graph
(LeakyReluBackwardBackward0 and the like) when a first derivative comes from
torch.autograd.grad; fastgrad's own first derivatives never build them.
"""

import torch

from . import ir, rules
from .ir import ew, add, mul, div, sub, neg, where

OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def up(t):
    """``t`` in the type PyTorch computes it in: float32 for a half type, else its own."""
    return ir.cast(t, OPMATH.get(t.dtype, t.dtype))


def opmath(f):
    """``f`` over x (and scalar parameters) computed in float32 where x is a half type."""
    def wrapped(x, *params):
        return ir.cast(f(up(x), *params), x.dtype)
    wrapped.__name__, wrapped.__doc__ = f.__name__, f.__doc__
    return wrapped


def _softplus_exp(x, beta, threshold):
    """(x*beta > threshold, exp(x*beta)) with the exp's argument capped at the threshold, so
    that the branch `where` discards cannot overflow to inf, whose zero cotangent would
    otherwise turn into NaN (0 * inf) in the derivative."""
    bx = mul(x, beta)
    over = ew("gt", bx, threshold)
    return over, ew("exp", where(over, threshold, bx))


@opmath
def softplus(x, beta, threshold):
    """x where x*beta > threshold, else log1p(exp(x*beta))/beta (_softplus_exp)."""
    over, z = _softplus_exp(x, beta, threshold)
    return where(over, x, div(ew("log1p", z), beta))


def softplus_backward(g, x, beta, threshold):
    """PyTorch's softplus_backward kernel: g where x*beta > threshold, else g * z / (z + 1),
    z = exp(x*beta) (_softplus_exp); in float32 for half types, rounded once."""
    over, z = _softplus_exp(up(x), beta, threshold)
    ug = up(g)
    return ir.cast(where(over, ug, div(mul(ug, z), add(z, 1.0))), x.dtype)


@opmath
def leaky_relu(x, slope):
    """x > 0 ? x : x * slope (NaN takes the slope, as PyTorch's backward does)."""
    return ir.tie_grad(where(ew("gt", x, 0.0), x, mul(x, slope)), x)


def _masked(value, x):
    """``value``, a grad_output masked (or scaled piecewise) by ``x``, which PyTorch's kernel
    reads only in the mask: PyTorch's derivative with respect to x is zeros, not absent, both
    the value's (ir.tie) and that of the cotangent it passes to the grad_output (ir.tie_grad),
    so that both require grad under create_graph as PyTorch's do."""
    return ir.tie(ir.tie_grad(value, x), x)


def leaky_relu_backward(g, x, slope):
    """x > 0 ? g : g * slope, in float32 for half types (_masked)."""
    ug = up(g)
    return _masked(ir.cast(where(ew("gt", up(x), 0.0), ug, mul(ug, slope)), g.dtype), x)


def threshold_backward(g, x, threshold):
    """x <= threshold ? 0 : g (relu's backward, with threshold 0; NaN passes g; _masked)."""
    return _masked(where(ew("le", x, threshold), 0.0, g), x)


def prelu(x, weight):
    """x > 0 ? x : weight * x, the weight a tensor broadcast against x (PyTorch saves it shaped
    so), tied to x as leaky_relu, and to the weight: PyTorch's one backward op makes both
    gradients require grad when either input does. The product reads both only where x > 0
    does not hold (else 0): where it does, its zero cotangent would meet a NaN or inf weight (a
    NaN derivative with respect to x) or an infinite x (with respect to the weight), where
    PyTorch's kernel selects g and 0."""
    pos = ew("gt", x, 0.0)
    neg_side = mul(where(pos, 0.0, weight), where(pos, 0.0, x))
    return ir.tie_grad(ir.tie_grad(where(pos, x, neg_side), x), weight)


@opmath
def elu(x, alpha, scale, input_scale):
    """ELU, and SELU / CELU through their parameters: x <= 0 ? alpha*scale*(exp(x*input_scale)
    - 1) : x*scale. The test is `x <= 0` as in PyTorch, so NaN takes the linear branch's
    derivative; exp sees only x <= 0 (else 0), so the discarded branch never overflows. exp - 1
    rather than expm1: the derivative is then exp itself, as PyTorch's, accurate far out on the
    negative side (expm1 + 1 cancels there); the value, which loses digits near 0, is what no
    derivative of it reads."""
    neg_side = ew("le", x, 0.0)
    e = sub(ew("exp", mul(where(ew("lt", x, 0.0), x, 0.0), input_scale)), 1.0)
    # At x = 0 PyTorch's first derivative is the negative side's, alpha*scale*input_scale, and
    # its second is 0: exp's argument takes x only below 0 (no second derivative at 0), and
    # this term, zero in value, carries the first derivative there.
    kink = mul(where(ew("eq", x, 0.0), x, 0.0), alpha * scale * input_scale)
    return where(neg_side, add(mul(e, alpha * scale), kink), mul(x, scale))


def elu_backward(g, x, alpha, scale, input_scale, is_result):
    """PyTorch's elu_backward kernel over ``x``, the input or (``is_result``) the output:
    x <= 0 ? g * input_scale * alpha*scale * exp(x * input_scale) (from the output:
    g * input_scale * (x + alpha*scale)) : g * scale, in float32 for half types."""
    ug, ux = up(g), up(x)
    # x enters the negative side only below 0: at 0 PyTorch's derivative with respect to x is
    # 0 (its double backward masks with x < 0), and a discarded +inf makes no 0 * inf
    xn = where(ew("lt", ux, 0.0), ux, 0.0)
    if is_result:
        neg_d = mul(add(xn, alpha * scale), input_scale)
    else:
        neg_d = mul(ew("exp", mul(xn, input_scale)), input_scale * alpha * scale)
    return ir.cast(where(ew("le", ux, 0.0), mul(ug, neg_d), mul(ug, scale)), g.dtype)


@opmath
def gelu(x):
    """x * Phi(x) = x/2 * (1 + erf(x / sqrt(2))), as the composite ``gelu`` (its value:
    rules.DECOMPOSE), whose derivative is PyTorch's single product g * slope (rules.gelu_slope):
    the product rule over the formula gave inf * 0 = NaN for an inf gradient where Phi(x) is
    0, and inf - inf where its two terms have opposite signs."""
    return ir.composite("gelu", x, ("none",))


def gelu_backward(g, x, approximate):
    """PyTorch's gelu_backward kernel, in float32 for half types: g * (Phi(x) + x * phi(x)), or
    of the tanh form (rules.gelu_slope)."""
    return ir.cast(mul(up(g), rules.gelu_slope(up(x), approximate)), g.dtype)


@opmath
def gelu_tanh(x):
    """GELU's tanh approximation, x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), as the
    composite ``gelu`` with approximate 'tanh' (as gelu)."""
    return ir.composite("gelu", x, ("tanh",))


@opmath
def silu(x):
    """x * sigmoid(x), as the composite ``silu``, whose derivative is PyTorch's single product
    (rules._silu_rule): the product rule's two terms gave inf - inf = NaN for an inf gradient,
    or where g * x overflows."""
    return ir.composite("silu", x, ())


@opmath
def mish(x):
    """x * tanh(softplus(x)) (softplus's threshold, 20, keeping exp finite), as the composite
    ``mish``, whose derivative is PyTorch's single product (rules._mish_rule), as silu's."""
    return ir.composite("mish", x, ())


def log_sigmoid(x, known_exp=lambda e: e):
    """min(x, 0) - log1p(exp(-|x|)), with -|x| and min(x, 0) written as selects on x < 0: exp's
    argument is never positive, so no derivative cancels (1 - e/(1+e) with e rounding to 1+e)
    or overflows; at 0 the x >= 0 side gives PyTorch's 1/2 and -1/4. ``known_exp`` binds
    exp(-|x|) to the buffer PyTorch's CPU kernel saved, so the first derivative computes no
    exp."""
    return opmath(_log_sigmoid)(x, known_exp)


def _log_sigmoid(x, known_exp):
    # the composite log_sigmoid over x and exp(-|x|): its derivative is PyTorch's single
    # product (rules._log_sigmoid_rule); the difference of the two terms' derivatives gave
    # inf - inf = NaN for an inf gradient
    e = known_exp(ew("exp", where(ew("lt", x, 0.0), x, neg(x))))
    return ir.node("log_sigmoid", (x, e), (), x.shape, x.dtype)


@opmath
def hardtanh(x, lo, hi):
    """clamp(x, lo, hi) with PyTorch's derivative mask: zero where x <= lo or x >= hi (the
    bounds excluded, unlike clamp's), and NaN passing the gradient through."""
    low, high = ew("le", x, lo), ew("ge", x, hi)
    return ir.tie_grad(where(ew("or", low, high), where(low, lo, hi), x), x)


def hardtanh_backward(g, x, lo, hi):
    """PyTorch's hardtanh_backward kernel: x <= lo or x >= hi ? 0 : g (NaN passes g;
    _masked)."""
    return _masked(where(ew("or", ew("le", x, lo), ew("ge", x, hi)), 0.0, g), x)


_HARDSWISH_EDGES = []


def _hardswish_edges():
    """(at -3, at 3): whether PyTorch's hardswish_backward takes the outer branch there (0 and
    g) rather than the middle one (g * (x/3 + 1/2)). Newer releases take the outer ones; older
    ones (2.5) the middle one at -3 and, in their vectorised loop, the outer one at 3 (their
    scalar loop takes the middle one there: large tensors decide). Read once from the CPU
    kernel (2.5's CUDA kernel, which takes the middle branch at 3 too, is not read)."""
    if not _HARDSWISH_EDGES:
        x = torch.tensor([-3.0, 3.0] * 64, dtype=torch.float64, device="cpu")
        r = torch.ops.aten.hardswish_backward(torch.ones_like(x), x)
        _HARDSWISH_EDGES.append((float(r[0]) == 0.0, float(r[1]) == 1.0))
    return _HARDSWISH_EDGES[0]


@opmath
def hardswish(x):
    """x * clamp(x + 3, 0, 6) / 6, as the composite ``hardswish`` (attrs: whether the installed
    PyTorch takes the outer branch at -3 and at 3, _hardswish_edges), whose value is written
    branch by branch (rules.DECOMPOSE) and whose derivative is PyTorch's kernel, one product
    g * (x/3 + 1/2) in the middle (rules.hardswish_grad): the product rule over x (x + 3) / 6
    gave inf - inf = NaN for an infinite gradient between -3 and 0. At NaN the derivative is
    NaN, as PyTorch's vectorised loop gives (its scalar loop gives g), and its own derivative 0,
    as PyTorch's double backward (strictly inside (-3, 3))."""
    return ir.composite("hardswish", x, _hardswish_edges())


def hardswish_backward(g, x):
    """PyTorch's hardswish_backward kernel: x <= -3 ? 0 : x >= 3 ? g : g * (x/3 + 1/2) (at -3
    and 3 as the installed PyTorch does: _hardswish_edges), in float32 for half types (NaN
    takes g, as its scalar loop does; its vectorised loop gives NaN)."""
    return ir.cast(rules.hardswish_grad(up(g), up(x), _hardswish_edges(), True), g.dtype)
