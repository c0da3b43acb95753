"""Matrix-product fallback nodes computing only their wanted edges (fastgrad/fallback_edges.py).

Each case differentiates a graph through MmBackward0 / AddmmBackward0 with respect to a subset
of the product's operands (the others require grad too, so the node has edges no one asked
for), first and second order, against torch. Every case must have gone through the rule (not a
call of the whole node). Each rule is also compared with a call of the node itself, edge subset
by edge subset: values bit for bit, and the layout PyTorch gives the gradient of a column-major
operand.
"""
import pytest
import torch

import fastgrad
from fastgrad import fallback_edges

from conftest import TORCH_GRAD, assert_same, check_grad, rand


@pytest.fixture
def served(monkeypatch):
    """Names of the nodes whose wanted edges the rules computed."""
    names = []
    real = fallback_edges.wanted_edges

    def spy(fn, gs, wanted):
        r = real(fn, gs, wanted)
        if r is not None:
            names.append(fn.name())
        return r

    monkeypatch.setattr(fallback_edges, "wanted_edges", spy)
    return names


def _colmajor(t):
    return t.t().contiguous().t()


# name -> (forward on the prepared leaves, leaf shapes, prep, which leaves to differentiate)
CASES = {
    "mm_wrt_first": (lambda a, b: torch.tanh(a.mm(b)), [(5, 4), (4, 3)], None, [0]),
    "mm_wrt_second": (lambda a, b: torch.tanh(a.mm(b)), [(5, 4), (4, 3)], None, [1]),
    "mm_first_column_major": (lambda a, b: torch.sin(a.mm(b)), [(5, 4), (4, 3)],
                              lambda a, b: (_colmajor(a), b), [0]),
    "mm_second_column_major": (lambda a, b: torch.sin(a.mm(b)), [(5, 4), (4, 3)],
                               lambda a, b: (a, _colmajor(b)), [1]),
    "linear_wrt_input": (lambda x, w, c: torch.tanh(torch.nn.functional.linear(x, w, c)),
                         [(6, 4), (3, 4), (3,)], None, [0]),
    "linear_wrt_weight": (lambda x, w, c: torch.tanh(torch.nn.functional.linear(x, w, c)),
                          [(6, 4), (3, 4), (3,)], None, [1]),
    "addmm_scaled_wrt_bias_and_mat2": (
        lambda c, a, b: torch.exp(torch.addmm(c, a, b, beta=0.5, alpha=-2.0)),
        [(3,), (5, 4), (4, 3)], None, [0, 2]),
    "addmm_scaled_wrt_mat1": (
        lambda c, a, b: torch.exp(torch.addmm(c, a, b, beta=1.5, alpha=3)),
        [(3,), (5, 4), (4, 3)], None, [1]),
}


@pytest.mark.parametrize("orders", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_wanted_edges_like_torch(name, orders, gen, served):
    fn, shapes, prep, which = CASES[name]
    leaves = [rand(s, gen).requires_grad_(True) for s in shapes]
    ins = prep(*leaves) if prep else leaves
    out = fn(*ins)
    wrt = [leaves[i] for i in which]
    go = rand(tuple(out.shape), gen)
    got = fastgrad.grad(out, wrt, go, retain_graph=True, create_graph=orders == 2)
    ref = TORCH_GRAD(out, wrt, go, create_graph=orders == 2)
    assert_same(got, ref, "order 1")
    if orders == 2:
        s_got = sum((g * g).sum() for g in got)
        s_ref = sum((r * r).sum() for r in ref)
        assert_same(fastgrad.grad(s_got, leaves, allow_unused=True, retain_graph=True),
                    TORCH_GRAD(s_ref, leaves, allow_unused=True), "order 2", none_is_zero=True)
    assert served and set(served) <= {"MmBackward0", "AddmmBackward0"}


def test_all_edges_wanted_calls_the_node(gen, served):
    """With every edge wanted the node itself runs (one call computes them all)."""
    check_grad(lambda a, b: torch.tanh(a.mm(b)), [rand((5, 4), gen), rand((4, 3), gen)],
               gen=gen, orders=2)
    assert "MmBackward0" not in served[:1]


def test_mlp_input_gradient_float32(gen, served):
    """A tanh MLP's input gradient and its second derivative (a PINN's u_x, u_xx), float32."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                              torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = rand((9, 2), gen, dtype=torch.float32).requires_grad_(True)
    u = net(x).sum()
    ux = fastgrad.grad(u, x, create_graph=True)[0]  # (keeps the graph)
    rx = TORCH_GRAD(u, x, create_graph=True)[0]
    assert_same(ux, rx)
    assert_same(fastgrad.grad(ux[:, 0].sum(), x, retain_graph=True),
                TORCH_GRAD(rx[:, 0].sum(), x))
    assert served.count("AddmmBackward0") >= 3


def _product_node(out):
    fn = out.grad_fn
    while fn.name() not in fallback_edges.EDGES:
        fn = fn.next_functions[0][0]
    return fn


@pytest.mark.parametrize("name", list(CASES))
def test_a_rule_gives_what_the_node_gives(name, gen):
    """For each wanted edge, the rule's result is the node's own: same values (bit for bit:
    the same products) and the same strides (a column-major operand's gradient is
    column-major in PyTorch)."""
    fn, shapes, prep, _ = CASES[name]
    leaves = [rand(s, gen).requires_grad_(True) for s in shapes]
    node = _product_node(fn(*(prep(*leaves) if prep else leaves)))
    go = rand(tuple(node._input_metadata[0].shape), gen)
    full = node(go)
    n = len(node.next_functions)
    for mask in range(1, 2 ** n - 1):  # every proper, non-empty subset of the edges
        wanted = [bool(mask >> i & 1) for i in range(n)]
        got = fallback_edges.wanted_edges(node, [go], wanted)
        assert got is not None
        for w, g, r in zip(wanted, got, full):
            if not w:
                assert g is None
                continue
            assert torch.equal(g, r) and g.stride() == r.stride(), f"edges {wanted}"


def _error(call):
    """The message of the RuntimeError ``call`` raises, or None."""
    try:
        call()
    except RuntimeError as e:
        return str(e)
    return None


# name -> (graph builder, what happens between the forward and the gradient)
TAMPERED = {
    "weight_modified_in_place": lambda x, w, b: w.mul_(2),
    "input_modified_in_place": lambda x, w, b: x.mul_(2),
}


@pytest.mark.parametrize("name", list(TAMPERED))
@pytest.mark.parametrize("wrt", ["weight", "bias"])
def test_a_rule_raises_what_the_node_raises(name, wrt, gen):
    """A saved tensor modified in place: PyTorch's node raises whichever edge is wanted, and
    so does the rule (it reads every saved tensor first)."""
    errors = []
    for G in (TORCH_GRAD, fastgrad.grad):
        h = rand((5, 4), gen).requires_grad_(True)
        x = h * 1  # (a non-leaf input of the product, so it may be modified in place)
        w, b = rand((3, 4), gen).requires_grad_(True), rand((3,), gen).requires_grad_(True)
        y = torch.nn.functional.linear(x, w, b).sum()
        with torch.no_grad():
            TAMPERED[name](x, w, b)
        errors.append(_error(lambda: G(y, w if wrt == "weight" else b)))
    assert errors[0] is not None and errors[1] == errors[0]


def test_a_rule_on_a_graph_torch_freed(gen):
    """After torch.autograd.grad freed a Linear's graph, the bias's gradient raises PyTorch's
    error (the bias rule needs no saved tensor, but the node would unpack them)."""
    errors = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x = rand((5, 4), gen).requires_grad_(True)
        lin = torch.nn.Linear(4, 3).double()
        y = lin(x).sum()
        TORCH_GRAD(y, x)
        errors.append(_error(lambda: G(y, lin.bias)))
    assert errors[0] is not None and errors[1] == errors[0]


def test_large_products_go_through_torch_with_their_node_hooks(gen):
    """Above the size where PyTorch's engine runs a fallback node, a hook registered on the
    product's node runs as in PyTorch (the rules serve the smaller, directly called ones)."""
    got = []
    x0, lin = rand((512, 32), gen), torch.nn.Linear(32, 256).double()
    for G in (TORCH_GRAD, fastgrad.grad):
        x = x0.clone().requires_grad_(True)
        y = torch.tanh(lin(x)).sum()
        node = y.grad_fn.next_functions[0][0].next_functions[0][0]
        assert node.name() == "AddmmBackward0"
        ran = []
        node.register_prehook(lambda gs: (ran.append(1), tuple(g * 2 for g in gs))[1])
        got.append((G(y, x)[0], len(ran)))
    assert_same(got[1][0], got[0][0])
    assert got[1][1] == got[0][1] == 1
