"""Derivative rules: one VJP per IR primitive, written in IR, and reverse mode over the IR.

Each rule takes the node ``n`` (its value is ``n`` itself: when PyTorch saved it, ``n`` is known and
the planner loads it) and the cotangent ``g`` (shape ``n.shape``) and returns one cotangent per
argument (None = zero). The formulas follow PyTorch's own (tools/autograd/derivatives.yaml) so
results and their inf/NaN behaviour match. Because rules produce IR, applying ``vjp`` to a derived
program gives the next order.

``DECOMPOSE`` gives the forward value of the few primitives that have a rule but no VM opcode; it
is used only when such a node's value is needed and was not saved.
"""
import math

from . import ir
from .ir import add, sub, mul, div, neg, where, ew, const, expand, rsum, reshape, permute, mm, \
    transpose

ZERO = None


def _restore(g, n):
    """Broadcast a keepdim-reduced cotangent back over the reduced node's input."""
    return expand(g, n.args[0].shape)


def _pow_rule(n, g):
    a, b = n.args
    if ir.is_const(b):
        e = b.attrs[0]
        # As PyTorch's pow_backward: e * a ** (e - 1), a pow node whatever e - 1 (ir.pow would
        # fold 1 and 2 into a and a * a), so each order depends on a until a ** 0, tied to a
        # (the gradient requires grad) and whose derivative is zeros, not absent.
        ga = ir.zeros(a.shape, a.dtype) if e == 0 else ir.tie(g, a) if e == 1 else \
            mul(g, mul(const(e), ew("pow", a, const(e - 1))))
    else:
        ga = where(ew("eq", b, 0.0), const(0.0), mul(g, mul(b, ir.pow(a, sub(b, 1.0)))))
    if ir.is_const(a):
        c = a.attrs[0]
        gb = mul(g, mul(n, ew("log", a))) if c != 0 else \
            mul(g, where(ew("ge", b, 0.0), const(0.0), mul(n, ew("log", a))))
    else:
        zero_base = ew("and", ew("eq", a, 0.0), ew("ge", b, 0.0))
        gb = mul(g, where(zero_base, const(0.0), mul(n, ew("log", a))))
    return [ga, gb]


def _minmax_rule(n, g):
    # torch.maximum/minimum: ties split the gradient in half; each side gets all of it unless
    # the other wins (so with a NaN on either side both get it, as PyTorch's masked_fill gives).
    a, b = n.args
    a_loses = ew("lt" if n.op == "max" else "gt", a, b)
    b_loses = ew("gt" if n.op == "max" else "lt", a, b)
    tie = ew("eq", a, b)
    half = div(g, 2.0)
    return [where(tie, half, where(a_loses, 0.0, g)), where(tie, half, where(b_loses, 0.0, g))]


def _amax_rule(n, g):
    # Ties share the gradient evenly (PyTorch's amax/amin and max()/min() of all elements).
    x, dims = n.args[0], n.attrs[0]
    mask = ew("eq", x, expand(n, x.shape))
    return [mul(expand(div(g, rsum(mask, dims)), x.shape), mask)]


def _evenly_rule(n, g):
    # max() / min() of every element, as PyTorch's evenly_distribute_backward: the gradient
    # shared by the elements equal to the result (by the NaNs where it is NaN). On the CPU
    # PyTorch fills the rest with 0, even where the gradient is inf or NaN; on a GPU it
    # multiplies by the mask, so there an inf gradient gives NaN off the mask (attrs[1]).
    x, (dims, product) = n.args[0], n.attrs
    v = expand(n, x.shape)
    mask = ew("or", ew("eq", x, v), ew("and", ew("isnan", x), ew("isnan", v)))
    share = expand(div(g, rsum(mask, dims)), x.shape)
    return [mul(share, mask) if product else where(mask, share, 0.0)]


def _std_root_rule(n, g):
    # PyTorch's std_backward: g / (2 * std), 0 where the std is 0 (a select: the division's
    # inf there is discarded, not multiplied)
    return [where(ew("eq", n, 0.0), 0.0, div(g, mul(n, 2.0)))]


def _decompose_std_root(n):
    s = n.args[0]
    zero = ew("eq", s, 0.0)  # (a harmless argument for the square root where it is masked)
    return where(zero, 0.0, ew("sqrt", where(zero, 1.0, s)))


def _clamp_rule(n, g):
    # (attrs[2]: the installed PyTorch gives 0 at a bound, lowering._clamp_excludes_bounds)
    x, (lo, hi, excluded) = n.args[0], n.attrs
    inside = None
    for m in ([ew("gt" if excluded else "ge", x, lo)] if lo is not None else []) + \
             ([ew("lt" if excluded else "le", x, hi)] if hi is not None else []):
        inside = m if inside is None else ew("and", inside, m)
    return [where(inside, g, 0.0)]


def _softmax_rule(n, g):
    d = n.attrs[0]
    return [mul(n, sub(g, expand(rsum(mul(g, n), (d,)), n.shape)))]


def _log_softmax_rule(n, g):
    d = n.attrs[0]
    return [sub(g, mul(ew("exp", n), expand(rsum(g, (d,)), n.shape)))]


def _norm2_rule(n, g):
    # PyTorch's 2-norm backward: g * (x / norm), with 0 where the norm is 0 (so its second
    # derivative there is NaN, as PyTorch's: 0 / 0 in div's rule)
    x = n.args[0]
    nx = expand(n, x.shape)
    return [mul(expand(g, x.shape), where(ew("eq", nx, 0.0), 0.0, div(x, nx)))]


def _silu_rule(n, g):
    # PyTorch's silu derivative (its kernel, and infinitely_differentiable_silu_backward under
    # create_graph): g * s * (1 + x * (1 - s)), s = sigmoid(x)
    x = n.args[0]
    s = ew("sigmoid", x)
    return [mul(mul(g, s), add(mul(x, sub(1.0, s)), 1.0))]


def gelu_slope(x, approximate):
    """d/dx gelu(x) as PyTorch's gelu_backward kernel computes it: Phi(x) + x * phi(x); with
    approximate 'tanh', 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 *
    x^2), t the tanh of its inner."""
    if approximate == "none":
        cdf = mul(add(ew("erf", mul(x, math.sqrt(0.5))), 1.0), 0.5)
        pdf = mul(ew("exp", mul(mul(x, x), -0.5)), 1.0 / math.sqrt(2.0 * math.pi))
        return add(cdf, mul(x, pdf))
    beta, kappa = math.sqrt(2.0 / math.pi), 0.044715
    x2 = mul(x, x)
    t = ew("tanh", mul(add(x, mul(mul(x2, x), kappa)), beta))
    inner_d = mul(add(mul(x2, 3.0 * kappa), 1.0), beta)
    return add(mul(add(t, 1.0), 0.5), mul(mul(mul(x, 0.5), sub(1.0, mul(t, t))), inner_d))


def _decompose_gelu(n):
    # x/2 * (1 + erf(x / sqrt(2))); 'tanh': x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    x = n.args[0]
    if n.attrs[0] == "none":
        return mul(mul(x, 0.5), add(ew("erf", mul(x, math.sqrt(0.5))), 1.0))
    inner = mul(add(x, mul(mul(mul(x, x), x), 0.044715)), math.sqrt(2.0 / math.pi))
    return mul(mul(x, 0.5), add(ew("tanh", inner), 1.0))


def hardswish_grad(g, x, edges, nan_passes):
    """PyTorch's hardswish_backward: x <= -3 ? 0 : x >= 3 ? g : g * (x/3 + 1/2), ``edges``
    (whether the kernel takes the outer branch at -3, at 3: activations._hardswish_edges)
    deciding at -3 and 3; at NaN g (``nan_passes``, its scalar loop) or NaN (its vectorised
    loop). The middle branch reads x only strictly inside (-3, 3), so its derivative with
    respect to x is g / 3 there and 0 elsewhere, as PyTorch's double backward, and a discarded
    +-inf or NaN makes no NaN; at an edge an older kernel counts in the middle: the edge itself
    there, a constant."""
    lo_outer, hi_outer = edges
    below_top = ew("lt" if hi_outer else "le", x, 3.0)
    strict = ew("and", ew("gt", x, -3.0), ew("lt", x, 3.0))
    edge = 0.0 if lo_outer and hi_outer else where(ew("lt", x, 0.0), -3.0, 3.0)
    mid = mul(g, add(div(where(strict, x, edge), 3.0), 0.5))
    low = ew("le" if lo_outer else "lt", x, -3.0)
    out = where(low, 0.0, where(below_top, mid, g))
    if nan_passes:
        return out
    # NaN at NaN, and NaN with respect to g there only: elsewhere the discarded product's
    # factor is 0, not NaN (0 * NaN would reach every element's derivative)
    nan = ew("isnan", x)
    return where(nan, mul(g, where(nan, math.nan, 0.0)), out)


def _decompose_hardswish(n):
    # 0 up to -3, x (x + 3) / 6 strictly between -3 and 3, x from 3 up (at -3 and 3 as the
    # installed PyTorch: attrs); x * 0 up to -3 (NaN at -inf); the middle branch sees x only
    # inside its range
    x, (lo_outer, hi_outer) = n.args[0], n.attrs
    low, high = ew("le" if lo_outer else "lt", x, -3.0), ew("ge" if hi_outer else "gt", x, 3.0)
    xm = where(ew("or", low, high), 0.0, x)
    mid = div(mul(xm, add(xm, 3.0)), 6.0)
    if not (lo_outer and hi_outer):
        # an older kernel's middle branch at an edge: the line through the edge
        strict = ew("and", ew("gt", x, -3.0), ew("lt", x, 3.0))
        edge = where(ew("lt", x, 0.0), mul(add(x, 3.0), -0.5), add(mul(sub(x, 3.0), 1.5), 3.0))
        mid = where(strict, mid, edge)
    top = div(mul(x, 6.0), 6.0)
    zero = where(ew("eq", x, -math.inf), math.nan, mul(ew("sign", x), 0.0))
    return where(low, zero, where(high, top, mid))


def _softplus20(x):
    """softplus(x) with PyTorch's default beta 1 and threshold 20 (exp's argument capped)."""
    over = ew("gt", x, 20.0)
    return where(over, x, ew("log1p", ew("exp", where(over, 20.0, x))))


def _mish_rule(n, g):
    # PyTorch's mish derivative (infinitely_differentiable_mish_backward, and its kernel):
    # g * (t + x * s * (1 - t * t)), t = tanh(log1p(exp(x))) (no threshold), s = sigmoid(x)
    x = n.args[0]
    t = ew("tanh", ew("log1p", ew("exp", x)))
    return [mul(g, add(t, mul(mul(x, ew("sigmoid", x)), sub(1.0, mul(t, t)))))]


def _log_sigmoid_rule(n, g):
    # PyTorch's log_sigmoid_backward: g * slope (the composite log_sigmoid_grad over x and z =
    # exp(-|x|), args[1], bound to PyTorch's buffer where it saved one); nothing flows through
    # z on its own (it is part of this derivative)
    x, z = n.args
    return [mul(g, ir.node("log_sigmoid_grad", (x, z), (), x.shape, x.dtype)), ZERO]


def _log_sigmoid_slope(x, z):
    # m - sign * z / (1 + z), m = 1 and sign = 1 below 0, else 0 and -1
    q = div(z, add(z, 1.0))
    return where(ew("lt", x, 0.0), sub(1.0, q), q)


def _log_sigmoid_grad_rule(n, g):
    # PyTorch's log_sigmoid_double_backward, not the slope's own derivative: g * (s - 1) * s,
    # s = sigmoid(x) (0 once s rounds to 1, where the slope's exact derivative is not)
    s = ew("sigmoid", n.args[0])
    return [mul(mul(g, sub(s, 1.0)), s), ZERO]


def _count(x, dims):
    return math.prod(x.shape[d] for d in dims)


def _var_rule(n, g):
    # PyTorch's var_backward: (2 / (N - correction)) * g * (x - mean(x)), the factor negative
    # where correction > N; over every element with no dims given and N - correction <= 0,
    # g * (NaN where x is its mean, else inf)
    x, (dims, correction, whole) = n.args[0], n.attrs
    dof = _count(x, dims) - correction
    m = expand(div(rsum(x, dims), float(_count(x, dims))), x.shape)
    if whole and dof <= 0:
        return [mul(expand(g, x.shape), where(ew("eq", x, m), math.nan, math.inf))]
    return [mul(expand(mul(g, 2.0 / dof if dof else math.inf), x.shape), sub(x, m))]


def _slice_rule(n, g):
    dim, start, step, _ = n.attrs
    return [ir.embed(g, dim, start, step, n.args[0].shape[dim])]


def _embed_rule(n, g):
    dim, start, step, _ = n.attrs
    return [ir.slice_(g, dim, start, step, n.args[0].shape[dim])]


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _nograd(n, g):
    return [ZERO] * len(n.args)


RULES = {
    "slot": lambda n, g: [g],
    "add": lambda n, g: [g, g],
    "sub": lambda n, g: [g, neg(g)],
    "mul": lambda n, g: [mul(g, n.args[1]), mul(g, n.args[0])],
    "div": lambda n, g: [div(g, n.args[1]),
                         mul(neg(g), div(div(n.args[0], n.args[1]), n.args[1]))],
    "neg": lambda n, g: [neg(g)],
    "pow": _pow_rule,
    "max": _minmax_rule,
    "min": _minmax_rule,
    "exp": lambda n, g: [mul(g, n)],
    "expm1": lambda n, g: [mul(g, add(n, 1.0))],
    "log": lambda n, g: [div(g, n.args[0])],
    "log1p": lambda n, g: [div(g, add(n.args[0], 1.0))],
    "erf": lambda n, g: [mul(g, mul(ew("exp", neg(mul(n.args[0], n.args[0]))),
                                    2.0 / math.sqrt(math.pi)))],
    "sin": lambda n, g: [mul(g, ew("cos", n.args[0]))],
    # (the inverse and hyperbolic functions as PyTorch writes them, rsqrt included)
    "tan": lambda n, g: [mul(g, add(mul(n, n), 1.0))],
    "atan": lambda n, g: [div(g, add(mul(n.args[0], n.args[0]), 1.0))],
    "sinh": lambda n, g: [mul(g, ew("cosh", n.args[0]))],
    "cosh": lambda n, g: [mul(g, ew("sinh", n.args[0]))],
    "asin": lambda n, g: [mul(g, ew("rsqrt", add(mul(neg(n.args[0]), n.args[0]), 1.0)))],
    "acos": lambda n, g: [mul(g, neg(ew("rsqrt", add(mul(neg(n.args[0]), n.args[0]), 1.0))))],
    "asinh": lambda n, g: [mul(g, ew("rsqrt", add(mul(n.args[0], n.args[0]), 1.0)))],
    "acosh": lambda n, g: [mul(g, ew("rsqrt", sub(mul(n.args[0], n.args[0]), 1.0)))],
    "atanh": lambda n, g: [mul(g, div(1.0, sub(1.0, mul(n.args[0], n.args[0]))))],
    "cos": lambda n, g: [mul(g, neg(ew("sin", n.args[0])))],
    "tanh": lambda n, g: [mul(g, sub(1.0, mul(n, n)))],
    "sigmoid": lambda n, g: [mul(mul(g, sub(1.0, n)), n)],
    "sqrt": lambda n, g: [div(g, mul(2.0, n))],
    "rsqrt": lambda n, g: [mul(mul(g, -0.5), mul(mul(n, n), n))],
    "reciprocal": lambda n, g: [mul(neg(g), mul(n, n))],
    "abs": lambda n, g: [mul(g, ew("sign", n.args[0]))],
    "relu": lambda n, g: [ir.tie(where(ew("le", n, 0.0), 0.0, g), n)],
    # (an explicit zero, as threshold_backward's derivative w.r.t. self in PyTorch: relu's
    # input gets zeros at the next order, not an absent gradient)
    # (the cotangent of the tied value stays tied to dep: PyTorch's derivative of
    # threshold_backward(g, x) with respect to g is threshold_backward(gg, x), which depends on
    # x, so it requires grad where x does)
    "tie": lambda n, g: [ir.tie(g, n.args[1], bool(n.attrs)),
                         ZERO if n.attrs else ir.zeros(n.args[1].shape, n.args[1].dtype)],
    "tie_grad": lambda n, g: [ir.tie(g, n.args[1], bool(n.attrs)), ZERO],
    "clamp": _clamp_rule,
    "where": lambda n, g: [ZERO, where(n.args[0], g, 0.0), where(n.args[0], 0.0, g)],
    "cast": lambda n, g: [ir.cast(g, n.args[0].dtype)],
    "rsum": lambda n, g: [_restore(g, n)],
    "rmax": _amax_rule,
    "rmin": _amax_rule,
    "max_all": _evenly_rule,
    "min_all": _evenly_rule,
    "lse": lambda n, g: [mul(_restore(g, n), ew("exp", sub(n.args[0], _restore(n, n))))],
    "norm2": _norm2_rule,
    "var": _var_rule,
    "std_root": _std_root_rule,
    "softmax": _softmax_rule,
    "log_softmax": _log_softmax_rule,
    # log2 and log10 (attrs: ln b), as PyTorch writes their derivative
    "log_base": lambda n, g: [div(g, mul(n.args[0], n.attrs[0]))],
    # (mse_loss's elementwise part: d^2 * norm / 2; PyTorch's backward, (norm * d) * g)
    "mse": lambda n, g: [mul(mul(n.args[0], n.attrs[0]), g)],
    "silu": _silu_rule,
    "mish": _mish_rule,
    # PyTorch's gelu derivative, one product g * slope (its kernel, and gelu_backward under
    # create_graph)
    "gelu": lambda n, g: [mul(g, gelu_slope(n.args[0], n.attrs[0]))],
    "hardswish": lambda n, g: [hardswish_grad(g, n.args[0], n.attrs, False)],
    "log_sigmoid": _log_sigmoid_rule,
    "log_sigmoid_grad": _log_sigmoid_grad_rule,
    "expand": lambda n, g: [ir.sum_to(g, n.args[0].shape)],
    "reshape": lambda n, g: [reshape(g, n.args[0].shape)],
    "permute": lambda n, g: [permute(g, _inverse(n.attrs[0]))],
    "mm": lambda n, g: [mm(g, transpose(n.args[1])), mm(transpose(n.args[0]), g)],
    "gather": lambda n, g: [ir.scatter(g, n.args[1], n.args[0].shape[0], n.attrs[0]), ZERO],
    "scatter": lambda n, g: [ir.gather(g, n.args[1], n.attrs[0]), ZERO],
    "slice": _slice_rule,
    "embed": _embed_rule,
}
# Boolean-valued in PyTorch: their results never require grad.
_PREDICATES = ("gt", "ge", "lt", "le", "eq", "ne", "isnan", "not", "and", "or", "iota", "zeros")
for _op in _PREDICATES:
    RULES[_op] = _nograd
RULES["sign"] = lambda n, g: [ir.zeros(n.shape, n.dtype)]


def differentiable_args(n):
    """Argument positions through which a result depends on grad-requiring inputs."""
    if n.op in _PREDICATES:
        return ()
    if n.op in ("gather", "scatter"):
        return (0,)  # (not through the index)
    return range(1, 3) if n.op == "where" else range(len(n.args))


def differentiable_deps(root, is_input):
    """The inputs ``root`` depends on differentiably (what PyTorch's requires_grad follows)."""
    found, seen, stack = set(), set(), [root]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        ix = is_input(n)
        if ix is not None:
            found.add(ix)
            continue
        stack.extend(n.args[i] for i in differentiable_args(n))
    return found


def _decompose_lse(n):
    x, dims = n.args[0], n.attrs[0]
    m = ir.reduce("rmax", x, dims)
    m = where(ew("eq", ew("abs", m), float("inf")), 0.0, m)  # as PyTorch: all -inf rows stay -inf
    return add(ew("log", rsum(ew("exp", sub(x, expand(m, x.shape))), dims)), m)


def _decompose_softmax(n, log):
    x, d = n.args[0], n.attrs[0]
    z = sub(x, expand(ir.reduce("rmax", x, (d,)), x.shape))
    s = expand(rsum(ew("exp", z), (d,)), x.shape)
    return sub(z, ew("log", s)) if log else div(ew("exp", z), s)


def _decompose_clamp(n):
    x, (lo, hi, _) = n.args[0], n.attrs
    if lo is not None:
        x = ew("max", x, lo)
    if hi is not None:
        x = ew("min", x, hi)
    return x


def _decompose_var(n):
    x, (dims, correction, _) = n.args[0], n.attrs
    d = sub(x, expand(div(rsum(x, dims), float(_count(x, dims))), x.shape))
    return div(rsum(mul(d, d), dims), float(max(0, _count(x, dims) - correction)))


DECOMPOSE = {
    "lse": _decompose_lse,
    "norm2": lambda n: ew("sqrt", rsum(mul(n.args[0], n.args[0]), n.attrs[0])),
    "var": _decompose_var,
    "std_root": _decompose_std_root,
    "max_all": lambda n: ir.reduce("rmax", n.args[0], n.attrs[0]),
    "min_all": lambda n: ir.reduce("rmin", n.args[0], n.attrs[0]),
    "softmax": lambda n: _decompose_softmax(n, False),
    "log_softmax": lambda n: _decompose_softmax(n, True),
    "clamp": _decompose_clamp,
    "log_base": lambda n: div(ew("log", n.args[0]), n.attrs[0]),
    "mse": lambda n: mul(mul(n.args[0], n.args[0]), n.attrs[0] / 2.0),
    "silu": lambda n: mul(n.args[0], ew("sigmoid", n.args[0])),
    "mish": lambda n: mul(n.args[0], ew("tanh", _softplus20(n.args[0]))),
    "gelu": _decompose_gelu,
    "hardswish": _decompose_hardswish,
    "log_sigmoid": lambda n: sub(where(ew("lt", n.args[0], 0.0), n.args[0], 0.0),
                                 ew("log1p", n.args[1])),
    "log_sigmoid_grad": lambda n: _log_sigmoid_slope(*n.args),
}


def vjp(outputs, cotangents, wrt):
    """Reverse mode: cotangents of ``wrt`` given those of ``outputs`` (None = zero)."""
    wrt_ids = {id(w) for w in wrt}
    order = ir.topo(outputs, stop_ids=wrt_ids)
    # Only nodes on a path to some wrt node carry gradient.
    reaches = set()
    for n in order:
        if id(n) in wrt_ids or any(id(n.args[i]) in reaches for i in differentiable_args(n)):
            reaches.add(id(n))
    ct = {}
    for o, c in zip(outputs, cotangents):
        if c is not None and id(o) in reaches:
            ct[id(o)] = c if id(o) not in ct else add(ct[id(o)], c)
    for n in reversed(order):
        g = ct.get(id(n))
        if g is None or id(n) in wrt_ids or not n.args:
            continue
        for a, ga in zip(n.args, RULES[n.op](n, g)):
            if ga is None or id(a) not in reaches:
                continue
            ga = ir.cast(ir.sum_to(ga, a.shape), a.dtype)
            ct[id(a)] = ga if id(a) not in ct else add(ct[id(a)], ga)
    return [ct.get(id(w)) for w in wrt]
