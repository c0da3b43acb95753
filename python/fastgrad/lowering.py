"""The lowering table: PyTorch autograd node name -> the forward op it came from, in IR.

Each entry receives a ``NodeView`` and returns the node's outputs as IR over its inputs
(``v.x(i, saved)``: the i-th input, read from the named saved tensor when PyTorch saved it).
``v.known(expr, saved)`` marks an output whose value PyTorch saved (e.g. ``exp``'s result), so the
rule that uses it loads it instead of recomputing. The derivative then comes from ``rules.py``.

A node that is not here, or whose saved attributes are not what its entry expects
(``Unsupported``), runs through PyTorch's own node instead.
"""
import math

import torch

from . import activations as act, ir, losses, moves, node_view, norms
from .ir import ew, add, sub, mul, div, neg, const, reshape
from .node_view import NodeView, Unsupported, saved_dim, signed, wrap_dims


def _reduced(v, op, x, dims_attr="_saved_dim"):
    dims = wrap_dims(v, v.raw(dims_attr), x.ndim) if dims_attr else tuple(range(x.ndim))
    r = ir.reduce(op, x, dims) if op != "rsum" else ir.rsum(x, dims)
    return r, dims


def _sum(v, dims_attr=None):
    x = v.x(0)
    r, _ = _reduced(v, "rsum", x, dims_attr)
    return r, x


def _sum_lower(v, dims_attr=None):
    r, _ = _sum(v, dims_attr)
    return [reshape(r, v.out_shape())]


def _mean_lower(v, dims_attr=None):
    r, x = _sum(v, dims_attr)
    n = ir.numel(x.shape) // max(ir.numel(r.shape), 1) if ir.numel(r.shape) else 0
    if not n and ir.numel(r.shape):
        # a mean over no elements, NaN: PyTorch's derivative expands the gradient over the
        # (empty) input before it divides by 0, so that a second derivative summing it over
        # the input gets 0, not NaN
        r, _ = _reduced(v, "rsum", div(x, 0.0), dims_attr)
        return [reshape(add(r, float("nan")), v.out_shape())]
    return [reshape(div(r, float(n) if n else float("nan")), v.out_shape())]


def _amax(v, op):
    x = v.x(0, "_saved_self")
    dims_attr = "_saved_dim" if hasattr(v.fn, "_saved_dim") else None
    if dims_attr is None and x.ndim and ir.numel(x.shape) > 1:
        # max() / min() of every element: their derivative differs from amax's where the
        # gradient is inf or the result NaN, and by device (rules._evenly_rule)
        r = ir.composite("max_all" if op == "rmax" else "min_all", x,
                         (tuple(range(x.ndim)), v.meta[0].device.type == "cuda"))
    else:
        r, _ = _reduced(v, op, x, dims_attr)
        if r is x and dims_attr is not None:
            # amax / amin over dims of size 1 only (or of a 0-d tensor): PyTorch's derivative
            # still divides by the count of elements equal to the result, which is 0 at a
            # NaN: x * (m / m), m = (x == x), is x with that derivative, NaN there
            m = ir.cast(ew("eq", x, x), x.dtype)
            r = mul(x, div(m, m))
    return [reshape(v.known(r, "_saved_result"), v.out_shape())]


def _max_dim(v):
    # max/min along a dim: the gradient goes to the selected index only.
    x = v.x(0)
    d = saved_dim(v, "_saved_dim", x.ndim)
    idx = v.tensor("_saved_indices")
    kshape = tuple(1 if i == d else s for i, s in enumerate(x.shape))
    idx = reshape(idx, kshape) if x.ndim else idx
    pick = ew("eq", ir.iota(x.shape, d, x.dtype), ir.expand(idx, x.shape)) if x.ndim else \
        const(1.0)
    sel = ir.where(pick, x, 0.0)
    return [reshape(ir.rsum(sel, (d,)) if x.ndim else sel, v.out_shape())]


def _lse(v):
    x = v.x(0, "_saved_self")
    dims = wrap_dims(v, v.raw("_saved_dim"), x.ndim) if x.ndim else ()
    if not dims:
        raise Unsupported("logsumexp of a 0-d tensor")
    r = ir.composite("lse", x, (dims,))
    return [reshape(v.known(r, "_saved_result"), v.out_shape())]


def _softmax(v, op):
    x = v.x(0)
    if x.ndim == 0:
        raise Unsupported("softmax of a 0-d tensor")
    d = saved_dim(v, "_saved_dim", x.ndim)
    return [v.known(ir.composite(op, x, (d,)), "_saved_result")]


def _clamp(v, lo_attr, hi_attr):
    x = v.x(0, "_saved_self")
    # PyTorch compares x with a bound converted to x's dtype (a scalar takes the tensor's):
    # 0.977 is 0.97705078125 in float16, where x == 0.97705078125 is inside the bound
    lo, hi = (None if a is None else _in_dtype(v.scalar(a), x.dtype) for a in (lo_attr, hi_attr))
    return [ir.node("clamp", (x,), (lo, hi, _clamp_excludes_bounds()), x.shape, x.dtype)]


_EXCLUDES_BOUNDS = []


def _clamp_excludes_bounds():
    """Whether the installed PyTorch's clamp with scalar bounds gives a gradient of 0 at a
    bound (2.14) or passes it there (earlier releases): asked once, on a throwaway graph."""
    if not _EXCLUDES_BOUNDS:
        with node_view.recording():
            x = torch.zeros(1, requires_grad=True)
            g, = torch.autograd.grad(x.clamp_min(0.0).sum(), x)
        _EXCLUDES_BOUNDS.append(bool(g.item() == 0.0))
    return _EXCLUDES_BOUNDS[0]


def _in_dtype(c, dtype):
    """Python number ``c`` rounded to floating ``dtype`` (as PyTorch converts a scalar
    operand to a tensor's dtype)."""
    if c is None or not dtype.is_floating_point or dtype == torch.float64 or \
            isinstance(c, bool) or not isinstance(c, (int, float)):
        return c
    return float(torch.tensor(float(c), dtype=dtype))


def _pow_scalar_exp(v):
    e = v.scalar("_saved_exponent")
    x = v.x(0, "_saved_self")
    # A pow node even for x ** 1 and x ** 2 (ir.pow would give x, x * x; the planner still
    # emits those): PyTorch's derivative is e * x ** (e - 1), a pow again, so every order of it
    # depends on x (requires grad) down to x ** 0, whose derivative is zeros, not absent.
    return [ew("pow", x, const(e))]


def _lerp(v):
    # start * (1 - w) + end * w: PyTorch's derivatives, g * (1 - w) and g * w, as single
    # products (start + (end - start) * w gave start g - g * w: inf - inf = NaN for an inf g)
    w = float(v.scalar("_saved_weight"))
    return [add(mul(v.x(0), 1.0 - w), mul(v.x(1), w))]


def _pow_tensors(v):
    x, e = v.x(0, "_saved_self"), v.x(1, "_saved_exponent")
    if torch.bool in (x.dtype, e.dtype):
        # PyTorch's derivative subtracts from a bool tensor (exponent - 1), which it refuses:
        # its node raises its own error
        raise Unsupported("a bool operand of pow")
    return [v.known(ew("pow", x, e), "_saved_result")]


def _pow_scalar_base(v):
    b = v.scalar("_saved_self")
    return [v.known(ew("pow", const(b), v.x(0, "_saved_exponent")), "_saved_result")]


def _to_copy(v):
    x = v.x(0)
    fn, k = v.edges[0]
    if fn is not None and fn._input_metadata[k].device != v.meta[0].device:
        raise Unsupported("copy between devices")
    return [ir.cast(x, v.out_dtype())]


def _region(v):
    region = v.fn.region
    saved = v.fn.saved_tensors  # raises PyTorch's own error once the graph is freed
    n = len(region.local_inputs)  # (a PlanBlock saves its products after its inputs)
    slots = [ir.slot(i, v._bind(t), tuple(t.shape), t.dtype) for i, t in enumerate(saved[:n])]
    mapping = {id(leaf): s for leaf, s in zip(region.local_inputs, slots)}
    # a block's IR binds its products to its saved tensors: to this call's numbers
    bound = [s.args[0].known for s in slots] + [v._bind(t).known for t in saved[n:]]
    again = []  # (saved_tensors unpacked once more, for all of them, if hooked() asks)

    def unpacked(i):
        if not again:
            again.append(v.fn.saved_tensors)
        return again[0][i]
    for i, (r, t) in enumerate(zip(getattr(v.fn, "_raw_saved_tensors", ()), saved)):
        node_view.note_hooks(v._bind, bound[i], r, t, lambda i=i: unpacked(i))
    return ir.substitute(region.local_outputs, mapping,
                         lambda m: None if m.known is None else bound[m.known])


def _softplus(v):
    beta, th = v.finite("_saved_beta"), v.finite("_saved_threshold")
    if beta == 0:
        raise Unsupported("softplus with beta 0")
    return [act.softplus(v.x(0, "_saved_self"), beta, th)]


def _elu(v, alpha, scale, input_scale):
    return [act.elu(v.x(0, "_saved_self"), alpha, scale, input_scale)]


def _celu(v):
    # PyTorch's CeluBackward0 takes the input scale as 1 / alpha with alpha rounded to float
    alpha = v.finite("_saved_alpha")
    return _elu(v, alpha, 1.0, 1.0 / float(torch.tensor(alpha, dtype=torch.float32)))


def _gelu(v):
    how = v.raw("_saved_approximate")
    if how not in ("none", "tanh"):
        raise Unsupported(f"gelu approximate={how!r}")
    return [(act.gelu if how == "none" else act.gelu_tanh)(v.x(0, "_saved_self"))]


def _gelu_backward(v):
    how = v.raw("_saved_approximate")
    if how not in ("none", "tanh"):
        raise Unsupported(f"gelu approximate={how!r}")
    return [act.gelu_backward(v.x(0, "_saved_grad_output"), v.x(1, "_saved_self"), how)]


def _elu_backward(v):
    is_result = v.raw("_saved_is_result")
    if not isinstance(is_result, bool):
        raise Unsupported(f"_saved_is_result is {type(is_result).__name__}")
    return [act.elu_backward(v.x(0, "_saved_grad_output"), v.x(1, "_saved_self_or_result"),
                             *(v.finite(f"_saved_{k}") for k in
                               ("alpha", "scale", "input_scale")), is_result)]


def _reduce_dims(v, x):
    if x.ndim == 0:
        raise Unsupported("a norm or moment of a 0-d tensor")
    d = v.raw("_saved_dim")
    return tuple(range(x.ndim)) if d is None else wrap_dims(v, d, x.ndim)


def _vector_norm(v):
    order = v.scalar("_saved_ord")
    if order not in (1, 2):
        raise Unsupported(f"vector norm of order {order}")
    x = v.x(0, "_saved_self")
    r = norms.vector_norm(x, order, _reduce_dims(v, x))
    return [reshape(v.known(r, "_saved_result"), v.out_shape())]


def _moment(v, std):
    x = v.x(0, "_saved_self")
    c = v.scalar("_saved_correction")
    dims = _reduce_dims(v, x)
    c = 1 if c is None else c
    whole = v.raw("_saved_dim") is None
    if not std:
        return [reshape(norms.var(x, dims, c, whole), v.out_shape())]
    return [reshape(v.known(norms.std(x, dims, c, whole), "_saved_result"), v.out_shape())]


def _layer_norm(v):
    k = len(v.raw("_saved_normalized_shape"))
    x = v.x(0, "_saved_input")
    w = None if v.raw("_saved_weight") is None else v.x(1, "_saved_weight")
    b = None if v.raw("_saved_bias") is None else v.x(2)
    if k == 0 or k > x.ndim:
        raise Unsupported("layer_norm over no dims")
    outs = norms.layer_norm(x, k, w, b, lambda e: v.known(e, "_saved_result1", True),
                            lambda e: v.known(e, "_saved_result2", True))
    return list(outs[:len(v.meta)])  # (PyTorch records the mean and rstd outputs or not)


def _batch_norm(v, eps="_saved_eps"):
    x = v.x(0, "_saved_input")
    training = v.raw("_saved_training")
    if x.ndim < 2 or not isinstance(training, bool):
        raise Unsupported("batch_norm input")
    stats = [v.raw(f"_saved_running_{k}") for k in ("mean", "var")]
    if not training and any(t is None for t in stats):
        raise Unsupported("batch_norm in evaluation without running statistics")
    w = None if v.raw("_saved_weight") is None else v.x(1, "_saved_weight")
    b = v.x(2) if v.edges[2][0] is not None else None  # (the bias's value is never read)
    return [norms.batch_norm(
        x, w, b, training, float(v.scalar(eps)),
        lambda e: v.known(e, "_saved_result1", True), lambda e: v.known(e, "_saved_result2", True),
        *(None if training else v.tensor(f"_saved_running_{k}") for k in ("mean", "var")))]


def _saved_if(v, i, name, other):
    """Input i, read from the saved tensor ``name``, which PyTorch saves only when input
    ``other`` requires grad (the product rule needs i's value for other's gradient)."""
    return v.x(i, name) if v.edges[other][0] is not None else v.x(i)


def _loss(v, fn, *params):
    e = fn(v.x(0, "_saved_self"), v.x(1, "_saved_target"), *params)
    return [reshape(losses.reduce(e, v.scalar("_saved_reduction")), v.out_shape())]


def _nll_loss(v):
    x = v.x(0, "_saved_self")  # (its value is not read: the gradient is tied to it)
    w = v.raw("_saved_weight")
    target = v.tensor("_saved_target")
    if x.ndim > 1 and target.shape != x.shape[:1] + x.shape[2:] or \
            x.ndim <= 1 and target.shape != ():
        raise Unsupported("nll_loss target shape")
    e = losses.nll_loss(x, target, None if w is None else v.tensor("_saved_weight"),
                        signed(v.scalar("_saved_ignore_index")), v.scalar("_saved_reduction"),
                        v.tensor("_saved_total_weight"))
    return [reshape(e, v.out_shape())]


def _huber(v):
    if v.raw("_saved_self").dtype != v.raw("_saved_target").dtype:
        # (PyTorch's kernel raises in the backward: its node, run as a fallback, says so)
        raise Unsupported("huber_loss with a target of another dtype")
    return _loss(v, losses.huber, v.finite("_saved_delta"))


def _smooth_l1(v):
    beta = v.finite("_saved_beta")
    if beta <= 0:
        raise Unsupported("smooth_l1 with beta 0")
    return _loss(v, losses.smooth_l1, beta)


def _matmul(v, i, first, second):
    """mm of inputs i and i + 1, read from the saved tensors ``first`` and ``second`` where
    PyTorch saved them: it saves each operand only when the other one's gradient needs it."""
    args = []
    for j, name in ((i, first), (i + 1, second)):
        t = v.raw(name)
        if t is not None and (not isinstance(t, torch.Tensor) or t.layout != torch.strided or
                              t.is_complex() or t.dim() != 2):
            raise Unsupported(f"{name} is not a real strided matrix")
        args.append(v.x(j, name if t is not None else None))
    try:
        return ir.mm(*args)
    except ValueError as e:
        raise Unsupported(str(e)) from None


def _addmm(v):
    alpha, beta = v.scalar("_saved_alpha"), v.scalar("_saved_beta")
    if alpha is None or beta is None:
        raise Unsupported("addmm without its scalars")
    prod = _matmul(v, 1, "_saved_mat1", "_saved_mat2")
    return [add(mul(v.x(0), float(beta)), mul(prod, float(alpha)))]


def _unary(op, saved):
    return lambda v: [ew(op, v.x(0, saved))]


def _unary_known(op):
    return lambda v: [v.known(ew(op, v.x(0)), "_saved_result")]


def _act_backward(formula):
    """The node PyTorch records for an activation's backward run under create_graph
    (TanhBackwardBackward0: ``tanh_backward(grad_output, output)``), when its first derivative
    came from torch.autograd.grad and fastgrad takes the next: PyTorch's own kernel formula
    over the saved grad_output and output, in float32 for half types as PyTorch computes it."""
    def lower(v):
        g, y = v.x(0, "_saved_grad_output"), v.x(1, "_saved_output")
        return [ir.cast(formula(act.up(g), act.up(y)), v.out_dtype())]
    return lower


LOWER = {
    "AddBackward0": lambda v: [add(v.x(0), mul(v.x(1), float(v.scalar("_saved_alpha"))))],
    "AddBackward1": lambda v: [v.x(0)],  # tensor + scalar
    "SubBackward0": lambda v: [sub(v.x(0), mul(v.x(1), float(v.scalar("_saved_alpha"))))],
    "SubBackward1": lambda v: [v.x(0)],
    "RsubBackward0": lambda v: [sub(v.x(1), mul(v.x(0), float(v.scalar("_saved_alpha"))))],
    "RsubBackward1": lambda v: [sub(0.0, mul(v.x(0), float(v.scalar("_saved_alpha"))))],
    "MulBackward0": lambda v: [mul(v.x(0, "_saved_self") if v.edges[1][0] else v.x(0),
                                   v.x(1, "_saved_other") if v.edges[0][0] else v.x(1))],
    "MulBackward1": lambda v: [mul(v.x(0), float(v.scalar("_saved_other")))],
    "DivBackward0": lambda v: [div(v.x(0, "_saved_self") if v.edges[1][0] else v.x(0),
                                   v.x(1, "_saved_other"))],
    "DivBackward1": lambda v: [div(v.x(0), float(v.scalar("_saved_other")))],
    "NegBackward0": lambda v: [neg(v.x(0))],
    "PowBackward0": _pow_scalar_exp,
    "PowBackward1": _pow_tensors,
    "PowBackward2": _pow_scalar_base,
    "ExpBackward0": _unary_known("exp"),
    "LogBackward0": _unary("log", "_saved_self"),
    "SinBackward0": _unary("sin", "_saved_self"),
    "CosBackward0": _unary("cos", "_saved_self"),
    "TanBackward0": _unary_known("tan"),
    "AtanBackward0": _unary("atan", "_saved_self"),
    "SinhBackward0": _unary("sinh", "_saved_self"),
    "CoshBackward0": _unary("cosh", "_saved_self"),
    "AsinBackward0": _unary("asin", "_saved_self"),
    "AcosBackward0": _unary("acos", "_saved_self"),
    "AsinhBackward0": _unary("asinh", "_saved_self"),
    "AcoshBackward0": _unary("acosh", "_saved_self"),
    "AtanhBackward0": _unary("atanh", "_saved_self"),
    "TanhBackward0": _unary_known("tanh"),
    "SigmoidBackward0": _unary_known("sigmoid"),
    "TanhBackwardBackward0": _act_backward(lambda g, y: mul(g, sub(1.0, mul(y, y)))),
    "SoftplusBackwardBackward0": lambda v: [ir.cast(act.softplus_backward(
        v.x(0, "_saved_grad_output"), v.x(1, "_saved_self"), v.finite("_saved_beta"),
        v.finite("_saved_threshold")), v.out_dtype())],
    "SigmoidBackwardBackward0": _act_backward(lambda g, y: mul(mul(g, sub(1.0, y)), y)),
    "IndexBackward0": moves.index,
    "IndexSelectBackward0": moves.index_select,
    "IndexAddBackward0": moves.index_add,
    "IndexPutBackward0": moves.index_put,
    "IndexPutImplBackward0": moves.index_put,
    "GeluBackwardBackward0": _gelu_backward,
    "EluBackwardBackward0": _elu_backward,
    "ThresholdBackwardBackward0": lambda v: [act.threshold_backward(
        v.x(0), v.x(1, "_saved_self"), float(v.scalar("_saved_threshold")))],
    "LeakyReluBackwardBackward0": lambda v: [act.leaky_relu_backward(
        v.x(0), v.x(1, "_saved_self"), v.finite("_saved_negative_slope"))],
    "HardswishBackwardBackward0": lambda v: [act.hardswish_backward(
        v.x(0, "_saved_grad_output"), v.x(1, "_saved_self"))],
    "HardtanhBackwardBackward0": lambda v: [act.hardtanh_backward(
        v.x(0), v.x(1, "_saved_self"), float(v.scalar("_saved_min_val")),
        float(v.scalar("_saved_max_val")))],
    "SoftplusBackward0": _softplus,
    "LeakyReluBackward0": lambda v: [act.leaky_relu(v.x(0, "_saved_self"),
                                                    v.finite("_saved_negative_slope"))],
    "PreluKernelBackward0": lambda v: [act.prelu(v.x(0, "_saved_self"),
                                                 v.x(1, "_saved_weight"))],
    "EluBackward0": lambda v: _elu(v, *(v.finite(f"_saved_{k}")
                                        for k in ("alpha", "scale", "input_scale"))),
    "CeluBackward0": _celu,
    "GeluBackward0": _gelu,
    "SiluBackward0": lambda v: [act.silu(v.x(0, "_saved_self"))],
    "MishBackward0": lambda v: [act.mish(v.x(0, "_saved_self"))],
    "LogSigmoidBackward0": lambda v: [act.log_sigmoid(
        v.x(0, "_saved_self"), lambda e: v.known(e, "_saved_buffer", detached=True))],
    "HardtanhBackward0": lambda v: [act.hardtanh(v.x(0, "_saved_self"),
                                                 float(v.scalar("_saved_min_val")),
                                                 float(v.scalar("_saved_max_val")))],
    "HardswishBackward0": lambda v: [act.hardswish(v.x(0, "_saved_self"))],
    "Log1PBackward0": _unary("log1p", "_saved_self"),
    "Expm1Backward0": _unary_known("expm1"),
    "ErfBackward0": _unary("erf", "_saved_self"),
    # (the composite log_base: PyTorch's derivative g / (x * ln b), where (g / ln b) / x
    # overflowed for a large g)
    "Log2Backward0": lambda v: [ir.composite("log_base", v.x(0, "_saved_self"),
                                             (math.log(2.0),))],
    "Log10Backward0": lambda v: [ir.composite("log_base", v.x(0, "_saved_self"),
                                              (math.log(10.0),))],
    "Exp2Backward0": lambda v: [v.known(ew("exp", mul(v.x(0), math.log(2.0))), "_saved_result")],
    "SignBackward0": lambda v: [ew("sign", v.x(0))],
    "AddcmulBackward0": lambda v: [add(v.x(0), mul(mul(_saved_if(v, 1, "_saved_tensor1", 2),
                                                       _saved_if(v, 2, "_saved_tensor2", 1)),
                                                   float(v.scalar("_saved_value"))))],
    "AddcdivBackward0": lambda v: [add(v.x(0), mul(div(_saved_if(v, 1, "_saved_tensor1", 2),
                                                       v.x(2, "_saved_tensor2")),
                                                   float(v.scalar("_saved_value"))))],
    "LerpBackward0": _lerp,
    "SqrtBackward0": _unary_known("sqrt"),
    "RsqrtBackward0": _unary_known("rsqrt"),
    "ReluBackward0": _unary_known("relu"),
    "AbsBackward0": _unary("abs", "_saved_self"),
    "ReciprocalBackward0": _unary_known("reciprocal"),
    "ClampBackward1": lambda v: _clamp(v, "_saved_min", "_saved_max"),
    "ClampMinBackward0": lambda v: _clamp(v, "_saved_min", None),
    "ClampMaxBackward0": lambda v: _clamp(v, None, "_saved_max"),
    "MaskedFillBackward0": lambda v: moves.masked_fill(v, False),
    "MaskedFillBackward1": lambda v: moves.masked_fill(v, True),
    "WhereBackward0": lambda v: [ir.where(v.tensor("_saved_condition"), v.x(0), v.x(1))],
    "SumBackward0": _sum_lower,
    "SumBackward1": lambda v: _sum_lower(v, "_saved_dim"),
    "MeanBackward0": _mean_lower,
    "MeanBackward1": lambda v: _mean_lower(v, "_saved_dim"),
    "AmaxBackward0": lambda v: _amax(v, "rmax"),
    "AminBackward0": lambda v: _amax(v, "rmin"),
    "MaxBackward1": lambda v: _amax(v, "rmax"),
    "MinBackward1": lambda v: _amax(v, "rmin"),
    "MaxBackward0": _max_dim,
    "MinBackward0": _max_dim,
    "LogsumexpBackward0": _lse,
    "LinalgVectorNormBackward0": _vector_norm,
    "MaximumBackward0": lambda v: [ew("max", v.x(0, "_saved_self"), v.x(1, "_saved_other"))],
    "MinimumBackward0": lambda v: [ew("min", v.x(0, "_saved_self"), v.x(1, "_saved_other"))],
    "MseLossBackward0": lambda v: [reshape(losses.mse(v.x(0, "_saved_self"),
                                                      v.x(1, "_saved_target"),
                                                      v.scalar("_saved_reduction")),
                                           v.out_shape())],
    "HuberLossBackward0": _huber,
    "SmoothL1LossBackward0": _smooth_l1,
    "NllLossBackward0": _nll_loss,
    "NllLoss2DBackward0": _nll_loss,
    "VarBackward0": lambda v: _moment(v, False),
    "StdBackward0": lambda v: _moment(v, True),
    "NativeLayerNormBackward0": _layer_norm,
    "NativeBatchNormBackward0": _batch_norm,
    # On a GPU with weight and bias, PyTorch runs cuDNN's (MIOpen's) kernel, whose node saves the
    # same mean and invstd (result1, result2) under another name for eps.
    "CudnnBatchNormBackward0": lambda v: _batch_norm(v, "_saved_epsilon"),
    "MiopenBatchNormBackward0": lambda v: _batch_norm(v, "_saved_epsilon"),
    "SoftmaxBackward0": lambda v: _softmax(v, "softmax"),
    "LogSoftmaxBackward0": lambda v: _softmax(v, "log_softmax"),
    "CatBackward0": moves.cat,
    "StackBackward0": lambda v: moves.cat(v, stack=True),
    "SplitBackward0": moves.split,
    "SplitWithSizesBackward0": lambda v: moves.split(v, v.raw("_saved_split_sizes")),
    "UnbindBackward0": moves.unbind,
    "ViewBackward0": lambda v: [reshape(v.x(0), v.out_shape())],
    "UnsafeViewBackward0": lambda v: [reshape(v.x(0), v.out_shape())],
    "ReshapeAliasBackward0": lambda v: [reshape(v.x(0), v.out_shape())],
    "UnsqueezeBackward0": lambda v: [reshape(v.x(0), v.out_shape())],
    "SqueezeBackward0": lambda v: [reshape(v.x(0), v.out_shape())],
    "SqueezeBackward1": lambda v: [reshape(v.x(0), v.out_shape())],
    "SqueezeBackward2": lambda v: [reshape(v.x(0), v.out_shape())],
    "AliasBackward0": lambda v: [v.x(0)],
    "CloneBackward0": lambda v: [v.x(0)],
    "ExpandBackward0": lambda v: [ir.expand(v.x(0), v.out_shape())],
    "PermuteBackward0": lambda v: [ir.permute(v.x(0), [signed(d) % max(len(v.out_shape()), 1)
                                                       for d in v.raw("_saved_dims")])],
    "TransposeBackward0": moves.transpose,
    "TBackward0": lambda v: [ir.permute(v.x(0), (1, 0)) if len(v.out_shape()) == 2 else v.x(0)],
    "SelectBackward0": moves.select,
    "SliceBackward0": moves.slice_,
    "ToCopyBackward0": _to_copy,
    "MmBackward0": lambda v: [_matmul(v, 0, "_saved_self", "_saved_mat2")],
    "AddmmBackward0": _addmm,
    "RegionFunctionBackward": _region,
}

# Nodes whose lowered forward computes what PyTorch's forward computed, up to rounding (the
# same function, as one VM op or plain arithmetic), so that a plan may compute a saved result
# of theirs again instead of loading it (sweep._link_saved, plan.RECOMPUTE). Not the others:
# an entry's forward need only be right where its derivative reads it. ELU's exp - 1 loses
# digits near 0 that expm1 keeps (activations.elu); the Scalar overloads of add and sub
# (AddBackward1, SubBackward1) and `1 - x` (RsubBackward1) lower without their scalar, which
# PyTorch does not save; PyTorch's vectorised sinh and cosh give inf from about 709.8 on, where
# fastgrad's are still finite.
FAITHFUL = frozenset([
    "AddBackward0", "SubBackward0", "RsubBackward0", "MulBackward0", "MulBackward1",
    "DivBackward0", "DivBackward1", "NegBackward0", "ExpBackward0", "LogBackward0",
    "SinBackward0", "CosBackward0", "TanBackward0", "AtanBackward0", "AsinBackward0",
    "AcosBackward0", "AsinhBackward0", "AcoshBackward0", "AtanhBackward0", "TanhBackward0",
    "SigmoidBackward0", "SoftplusBackward0", "Log1PBackward0", "Expm1Backward0",
    "ErfBackward0", "SqrtBackward0", "RsqrtBackward0", "ReluBackward0", "AbsBackward0",
    "ReciprocalBackward0", "AliasBackward0", "CloneBackward0",
])


def lower(fn, bind):
    """Forward IR of one PyTorch node: (outputs, slots) or raise Unsupported."""
    name = fn.name()
    entry = LOWER.get(name)
    if entry is None:
        raise Unsupported("no lowering rule")
    v = NodeView(fn, bind)
    outs = entry(v)
    if len(outs) != len(v.meta):
        raise Unsupported("output count")
    for j, o in enumerate(outs):
        # PyTorch records no shape for a Function's non-differentiable outputs; our own regions
        # know theirs.
        if o.shape != v.out_shape(j) and name != "RegionFunctionBackward":
            raise Unsupported(f"lowered shape {o.shape} != {v.out_shape(j)}")
        if o.dtype is not None and o.dtype != v.out_dtype(j):
            outs[j] = ir.cast(o, v.out_dtype(j))
    return outs

