"""The wanted edges of PyTorch's matrix-product nodes, for engine._call_opaque.

A fallback node called directly computes a gradient for every edge. A Linear layer's
AddmmBackward0 then also computes its weight's and bias's gradients when only its input's is
asked for: the common case when differentiating a network with respect to its input. For the
nodes in EDGES, only the wanted edges are computed, with the torch ops PyTorch's own formulas
use (``mm_mat1_backward`` / ``mm_mat2_backward`` in FunctionsManual.cpp: the same products, the
same result layouts), so the values, and with create_graph the recorded graph, are those the
node would give.

Each rule reads the node's saved values and returns one result per edge (None where not
wanted), or None when the call is outside what it covers (complex or non-strided tensors, a
saved value missing): the node is then called as before. Every saved tensor is read first, as
the node would, so a tensor modified in place or a freed graph raises PyTorch's error. The rules
serve only where the node would otherwise be called directly (small gradients:
engine._call_opaque), so hooks registered on the node itself (``grad_fn.register_hook``) do not
run, as before; larger ones go through PyTorch's engine, which runs them.
"""
import torch


def _scaled(t, s):
    return t if s == 1 else t * s


def _column_major(sizes, strides):
    return strides[0] == 1 and strides[1] == sizes[0]


def _mat1_grad(grad, mat2, sizes, strides, alpha):
    # a column-major mat1 gets a column-major gradient, as in PyTorch
    if _column_major(sizes, strides):
        return _scaled(mat2.mm(grad.t()).t(), alpha)
    return _scaled(grad.mm(mat2.t()), alpha)


def _mat2_grad(grad, mat1, sizes, strides, alpha):
    if _column_major(sizes, strides):
        return _scaled(grad.t().mm(mat1).t(), alpha)
    return _scaled(mat1.t().mm(grad), alpha)


def _saved(fn, *names):
    vals = [getattr(fn, "_saved_" + n, None) for n in names]
    for v in vals:
        if v is None or (isinstance(v, torch.Tensor) and v.layout != torch.strided):
            return None
        if isinstance(v, tuple) and len(v) != 2:  # (sizes or strides of a matrix)
            return None
    return vals


def _unpack_all(fn, names):
    """Read every saved tensor of the node, as the node itself does before computing: PyTorch
    then raises its own error for one modified in place or for a freed graph, whichever edge
    is wanted."""
    for n in names:
        getattr(fn, "_saved_" + n)


def _mm(fn, grad, wanted):
    """MmBackward0, edges (self, mat2)."""
    _unpack_all(fn, ("self", "mat2"))
    out = [None, None]
    if wanted[0]:
        got = _saved(fn, "mat2", "self_sym_sizes", "self_sym_strides")
        if got is None:
            return None
        out[0] = _mat1_grad(grad, *got, 1)
    if wanted[1]:
        got = _saved(fn, "self", "mat2_sym_sizes", "mat2_sym_strides")
        if got is None:
            return None
        out[1] = _mat2_grad(grad, *got, 1)
    return out


def _addmm(fn, grad, wanted):
    """AddmmBackward0, edges (self, mat1, mat2)."""
    alpha, beta = getattr(fn, "_saved_alpha", None), getattr(fn, "_saved_beta", None)
    if type(alpha) not in (int, float) or type(beta) not in (int, float):
        return None
    _unpack_all(fn, ("mat1", "mat2"))
    out = [_scaled(grad, beta) if wanted[0] else None, None, None]
    if wanted[1]:
        got = _saved(fn, "mat2", "mat1_sym_sizes", "mat1_sym_strides")
        if got is None:
            return None
        out[1] = _mat1_grad(grad, *got, alpha)
    if wanted[2]:
        got = _saved(fn, "mat1", "mat2_sym_sizes", "mat2_sym_strides")
        if got is None:
            return None
        out[2] = _mat2_grad(grad, *got, alpha)
    return out


# node name -> rule(node, grad of its one output, wanted per edge)
EDGES = {
    "MmBackward0": _mm,
    "AddmmBackward0": _addmm,
}


def wanted_edges(fn, gs, wanted):
    """The results of node ``fn`` for the ``wanted`` edges only, or None (call the node)."""
    rule = EDGES.get(fn.name())
    if rule is None or len(gs) != 1:
        return None
    g = gs[0]
    if type(g) is not torch.Tensor or g.layout != torch.strided or g.dim() != 2 or \
            not g.dtype.is_floating_point:
        return None
    return rule(fn, g, wanted)
