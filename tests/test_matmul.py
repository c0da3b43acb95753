"""Matrix products (MmBackward0, AddmmBackward0: every Linear) as native nodes: lowered to
ir.mm, derived by its rule, run by the plan as MatmulSteps (torch.mm) between fused regions.

Each case differentiates with respect to some of the product's operands (the others may require
grad too), first and second order, against torch; the explain report must show every product
native. Errors PyTorch's node raises (a saved operand modified in place, a freed graph) are
raised the same."""
import pytest
import torch

import fastgrad
from conftest import DEVICE_PARAMS as DEVICES, TORCH_GRAD, assert_same, check_grad, rand


def _colmajor(t):
    return t.t().contiguous().t()


def _linear(x, w, c):
    return torch.nn.functional.linear(x, w, c)


# name -> (forward on the prepared leaves, leaf shapes, prep, which leaves to differentiate)
CASES = {
    "mm_wrt_first": (lambda a, b: torch.tanh(a.mm(b)), [(5, 4), (4, 3)], None, [0]),
    "mm_wrt_second": (lambda a, b: torch.tanh(a.mm(b)), [(5, 4), (4, 3)], None, [1]),
    "mm_wrt_both": (lambda a, b: torch.sin(a @ b), [(5, 4), (4, 3)], None, [0, 1]),
    "mm_first_column_major": (lambda a, b: torch.sin(a.mm(b)), [(5, 4), (4, 3)],
                              lambda a, b: (_colmajor(a), b), [0, 1]),
    "mm_of_transposes": (lambda a, b: torch.exp(a.t().mm(b.t()) * 0.25), [(4, 5), (3, 4)],
                         None, [0, 1]),
    "mm_same_operand": (lambda a: torch.tanh(a.mm(a)), [(4, 4)], None, [0]),
    "mm_vector_like": (lambda a, b: torch.sigmoid(a.mm(b)), [(1, 6), (6, 1)], None, [0, 1]),
    "linear_wrt_input": (lambda x, w, c: torch.tanh(_linear(x, w, c)),
                         [(6, 4), (3, 4), (3,)], None, [0]),
    "linear_wrt_weight": (lambda x, w, c: torch.tanh(_linear(x, w, c)),
                          [(6, 4), (3, 4), (3,)], None, [1]),
    "linear_wrt_all": (lambda x, w, c: torch.tanh(_linear(torch.sigmoid(x), w, c)),
                       [(5, 4), (3, 4), (3,)], None, [0, 1, 2]),
    "addmm_scaled_wrt_bias_and_mat2": (
        lambda c, a, b: torch.exp(torch.addmm(c, a, b, beta=0.5, alpha=-2.0)),
        [(3,), (5, 4), (4, 3)], None, [0, 2]),
    "addmm_scaled_wrt_mat1": (
        lambda c, a, b: torch.exp(torch.addmm(c, a, b, beta=1.5, alpha=3)),
        [(3,), (5, 4), (4, 3)], None, [1]),
    "addmm_full_bias": (lambda c, a, b: torch.tanh(torch.addmm(c, a, b)),
                        [(5, 3), (5, 4), (4, 3)], None, [0, 1]),
    # an inner size of 1 (an outer product) is an elementwise multiply (ir.mm), fused
    "linear_scalar_output": (lambda x, w, c: torch.tanh(_linear(torch.sin(x), w, c)),
                             [(6, 4), (1, 4), (1,)], None, [0, 1]),
    "linear_one_feature": (lambda x, w, c: torch.tanh(_linear(x, w, c)),
                           [(6, 1), (4, 1), (4,)], None, [0, 1, 2]),
}
# cases whose every product (the forward's and the derivatives', at both orders) has an inner
# size of 1: none runs as torch.mm
OUTER_ONLY = {"mm_vector_like", "linear_one_feature"}


def _native(report, name=None):
    assert not report.fallback, str(report)
    assert {"MmBackward0", "AddmmBackward0"} & set(report.native), str(report)
    assert ("torch.mm" in str(report)) != (name in OUTER_ONLY), str(report)


@pytest.mark.parametrize("orders", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_products_like_torch(device, name, orders, gen):
    _products_like_torch(device, name, orders, gen, lambda report: _native(report, name))


def _rewrite_everywhere(monkeypatch, threshold):
    """A plan rewrite whose row threshold is plan.<threshold> applied whatever the row count;
    the caches holding plans are emptied before and after (a generator: the fixtures' body)."""
    from fastgrad import graph_cache, plan
    monkeypatch.setattr(plan, threshold, 1)
    plan.clear_plan_cache()
    graph_cache.clear()
    yield
    plan.clear_plan_cache()
    graph_cache.clear()


@pytest.fixture
def narrow_everywhere(monkeypatch):
    """Every product with few output columns planned as row sums (plan._narrow_product)."""
    yield from _rewrite_everywhere(monkeypatch, "NARROW_ROWS")


def _row_sums_ran(report):
    assert not report.fallback, str(report)
    assert "reduce over dims [1]" in str(report), str(report)


def _narrow_as_planned(device):
    """The report check of a narrow product: row sums on the CPU; on a GPU torch.mm, which
    cuBLAS runs faster than a region's row sums (plan._decompose)."""
    return _row_sums_ran if device == "cpu" else lambda report: _native(report)


@pytest.mark.parametrize("orders", [1, 2])
@pytest.mark.parametrize("name", [n for n in CASES if n not in OUTER_ONLY])
@pytest.mark.parametrize("device", DEVICES)
def test_narrow_products_as_row_sums(device, name, orders, gen, narrow_everywhere):
    # each of these cases has a product of at most 4 columns, at both orders
    _products_like_torch(device, name, orders, gen, _narrow_as_planned(device))


@pytest.mark.parametrize("device", DEVICES)
def test_narrow_product_at_its_row_threshold(device, gen):
    """The input layer's VJP of an MLP over 2 coordinates, with plan.NARROW_ROWS rows: on the
    CPU its product [N, 6] x [6, 2] runs as row sums fused with the tanh layer's work, no
    torch.mm; on a GPU as torch.mm."""
    from fastgrad import plan
    n = plan.NARROW_ROWS
    x = rand((n, 2), gen, device=device).requires_grad_(True)
    w = rand((6, 2), gen, device=device).requires_grad_(True)
    out = torch.tanh(_linear(x, w, None))
    go = rand((n, 6), gen, device=device)
    report = fastgrad.explain(out, x, go)
    _narrow_as_planned(device)(report)
    assert ("torch.mm" in str(report)) == (device != "cpu"), str(report)
    assert_same(fastgrad.grad(out, x, go, retain_graph=True),
                TORCH_GRAD(out, x, go, retain_graph=True))
    (g,) = fastgrad.grad(out, x, go, create_graph=True)
    (gt,) = TORCH_GRAD(out, x, go, create_graph=True)
    assert_same(g, gt)
    assert_same(fastgrad.grad((g * g).sum(), [x, w], retain_graph=True),
                TORCH_GRAD((gt * gt).sum(), [x, w]), "order 2")


class _OnGpu:
    """Stands for a bound CUDA tensor where only the planner looks (plan.get_plan)."""
    is_cuda = True


def test_narrow_products_planned_by_device(narrow_everywhere):
    """One set of IR nodes gets a plan per device when it holds a narrow product, whichever
    device comes first, and both stay cached; a plan without one serves both devices."""
    from fastgrad import ir, plan
    a = ir.leaf(0, (40, 6), torch.float64)
    b = ir.leaf(1, (6, 2), torch.float64)
    narrow = [ir.ew("tanh", ir.mm(ir.ew("sin", a), b))]
    kinds = lambda p: sorted(type(s).__name__ for s in p.steps)  # noqa: E731
    for first in (False, True):
        plan.clear_plan_cache()
        order = [first, not first, first, not first]
        plans = [plan.get_plan(narrow, [_OnGpu()] if gpu else []) for gpu in order]
        assert plans[0] is plans[2] and plans[1] is plans[3] and plans[0] is not plans[1]
        for p, gpu in zip(plans, order):
            assert p.cuda is gpu
            assert ("MatmulStep" in kinds(p)) == gpu, kinds(p)
    wide = [ir.ew("tanh", ir.mm(ir.ew("sin", a), ir.leaf(2, (6, 7), torch.float64)))]
    p = plan.get_plan(wide, [])
    assert p.cuda is None and plan.get_plan(wide, [_OnGpu()]) is p


@pytest.fixture
def column_products_everywhere(monkeypatch):
    """Every column sum of a product with a column planned as a matrix product
    (plan._column_product)."""
    yield from _rewrite_everywhere(monkeypatch, "COLUMN_ROWS")


@pytest.mark.parametrize("orders", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_column_products_as_products(device, name, orders, gen, column_products_everywhere):
    def check(report):
        assert not report.fallback, str(report)
        # the one-feature layer's weight gradient: a column sum of the cotangent [6, 4]
        # times the input column [6, 1], as the product [1, 6] x [6, 4]
        assert (name == "linear_one_feature") <= ("matmul [1, 6] x [6, 4]" in str(report)), \
            str(report)
    _products_like_torch(device, name, orders, gen, check)


def test_column_products_only_where_they_pay(column_products_everywhere):
    """A column sum of a product with a column stays a region where the product is bound (read
    as PyTorch saved it) or its other factor a broadcast (BLAS would need it written out)."""
    from fastgrad import ir, plan
    f64 = torch.float64
    x, c, w = ir.leaf(0, (40, 5), f64), ir.leaf(1, (40, 1), f64), ir.leaf(2, (1, 5), f64)
    kinds = lambda exprs: sorted(type(s).__name__ for s in plan.build(exprs).steps)  # noqa: E731
    assert "MatmulStep" in kinds([ir.rsum(ir.mul(ir.ew("sin", x), c), (0,))])
    assert "MatmulStep" in kinds([ir.rsum(ir.mul(c, x), (0,))])
    bound = ir.with_known(ir.mul(ir.ew("sin", x), c), 3)
    assert "MatmulStep" not in kinds([ir.rsum(bound, (0,))])
    assert "MatmulStep" not in kinds([ir.rsum(ir.mul(ir.expand(w, (40, 5)), c), (0,))])
    assert "MatmulStep" not in kinds([ir.rsum(ir.mul(ir.ew("sin", x), c), (1,))])


@pytest.mark.parametrize("device", DEVICES)
def test_column_product_at_its_row_threshold(device, gen):
    """A critic's last layer (one output) over plan.COLUMN_ROWS rows, differentiated with
    create_graph and then again with respect to its weights (WGAN-GP's penalty): the weight
    gradient of its outer product is a column sum of a product with the cotangent column; it
    runs as a product [1, N] x [N, 5], no column-sum region, at both orders."""
    from fastgrad import plan
    n = plan.COLUMN_ROWS
    x = rand((n, 3), gen, device=device).requires_grad_(True)
    w1 = rand((5, 3), gen, device=device).requires_grad_(True)
    w2 = rand((1, 5), gen, device=device).requires_grad_(True)
    out = _linear(torch.tanh(_linear(x, w1, None)), w2, None)
    go = rand((n, 1), gen, device=device)
    (g,) = fastgrad.grad(out, x, go, create_graph=True)
    (gt,) = TORCH_GRAD(out, x, go, create_graph=True)
    assert_same(g, gt)
    penalty, penalty_t = [(d.square().sum(dim=1) - 1).square().sum() for d in (g, gt)]
    report = fastgrad.explain(penalty, [w1, w2])
    assert not report.fallback, str(report)
    assert f"matmul [1, {n}] x [{n}, 5]" in str(report), str(report)
    assert "reduce over dims [0]" not in str(report), str(report)
    assert_same(fastgrad.grad(penalty, [w1, w2], retain_graph=True),
                TORCH_GRAD(penalty_t, [w1, w2]), "order 2")


def _products_like_torch(device, name, orders, gen, check_report):
    fn, shapes, prep, which = CASES[name]
    leaves = [rand(s, gen, device=device).requires_grad_(True) for s in shapes]
    ins = prep(*leaves) if prep else leaves
    out = fn(*ins)
    wrt = [leaves[i] for i in which]
    go = rand(tuple(out.shape), gen, device=device)
    check_report(fastgrad.explain(out, wrt, go, create_graph=orders == 2))
    got = fastgrad.grad(out, wrt, go, retain_graph=True, create_graph=orders == 2)
    ref = TORCH_GRAD(out, wrt, go, create_graph=orders == 2)
    assert_same(got, ref, "order 1")
    if orders == 2:
        assert [g.requires_grad for g in got] == [r.requires_grad for r in ref]
        s_got = sum((g * g).sum() for g in got)
        s_ref = sum((r * r).sum() for r in ref)
        check_report(fastgrad.explain(s_got, leaves, allow_unused=True))
        assert_same(fastgrad.grad(s_got, leaves, allow_unused=True, retain_graph=True),
                    TORCH_GRAD(s_ref, leaves, allow_unused=True), "order 2", none_is_zero=True)


def test_third_order_through_products(gen):
    check_grad(lambda x, w: torch.tanh(torch.sin(x) @ w), [rand((3, 4), gen), rand((4, 5), gen)],
               gen=gen, orders=3, native=True)


def test_linear_model_all_parameters(gen):
    """Linear layers between native activations; gradients w.r.t. input and weights."""
    lin = torch.nn.Linear(4, 3).double()
    params = [p.detach().clone() for p in lin.parameters()]
    check_grad(lambda x, w, b: torch.tanh(_linear(torch.sigmoid(x), w, b)),
               [rand((5, 4), gen)] + params, gen=gen, orders=2, native=True)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_input_gradient_float32(device, gen):
    """A tanh MLP's input gradient and its second derivative (a PINN's u_x, u_xx), float32,
    every node native at both orders."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                              torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    x = rand((9, 2), gen, dtype=torch.float32, device=device).requires_grad_(True)
    u = net(x).sum()
    _native(fastgrad.explain(u, x, create_graph=True))
    ux = fastgrad.grad(u, x, create_graph=True)[0]  # (keeps the graph)
    rx = TORCH_GRAD(u, x, create_graph=True)[0]
    assert_same(ux, rx)
    _native(fastgrad.explain(ux[:, 0].sum(), x))
    for _ in range(3):  # later calls: the cached plan (and the Executor) give the same
        assert_same(fastgrad.grad(ux[:, 0].sum(), x, retain_graph=True),
                    TORCH_GRAD(rx[:, 0].sum(), x, retain_graph=True))


def test_product_without_grad_mode_leaks_no_graph(gen):
    """Without create_graph the products run with grad mode off, as in PyTorch's engine: the
    gradient w.r.t. an input does not require grad even though the weights do."""
    x = rand((6, 4), gen).requires_grad_(True)
    lin = torch.nn.Linear(4, 3).double()
    y = torch.tanh(lin(x)).sum()
    (g,) = fastgrad.grad(y, x)
    assert not g.requires_grad and g.grad_fn is None


def _error(call):
    """The message of the RuntimeError ``call`` raises, or None."""
    try:
        call()
    except RuntimeError as e:
        return str(e)
    return None


# what happens between the forward and the gradient
TAMPERED = {
    "weight_modified_in_place": lambda x, w, b: w.mul_(2),
    "input_modified_in_place": lambda x, w, b: x.mul_(2),
}


@pytest.mark.parametrize("name", list(TAMPERED))
@pytest.mark.parametrize("wrt", ["input", "weight", "bias"])
def test_raises_what_the_node_raises(name, wrt, gen):
    """A saved operand modified in place: PyTorch's node raises whichever edge is wanted, and
    so does fastgrad (lowering reads every saved operand)."""
    errors = []
    for G in (TORCH_GRAD, fastgrad.grad):
        h = rand((5, 4), gen).requires_grad_(True)
        x = h * 1  # (a non-leaf input of the product, so it may be modified in place)
        w, b = rand((3, 4), gen).requires_grad_(True), rand((3,), gen).requires_grad_(True)
        y = _linear(x, w, b).sum()
        with torch.no_grad():
            TAMPERED[name](x, w, b)
        errors.append(_error(lambda: G(y, {"input": h, "weight": w, "bias": b}[wrt])))
    assert errors[0] is not None and errors[1] == errors[0]


def test_a_graph_torch_freed(gen):
    """After torch.autograd.grad freed a Linear's graph, the bias's gradient raises PyTorch's
    error (its rule needs no saved tensor, but the node would unpack them)."""
    errors = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x = rand((5, 4), gen).requires_grad_(True)
        lin = torch.nn.Linear(4, 3).double()
        y = lin(x).sum()
        TORCH_GRAD(y, x)
        errors.append(_error(lambda: G(y, lin.bias)))
    assert errors[0] is not None and errors[1] == errors[0]


def test_a_broadcast_operand_is_a_view(gen):
    """The VJP of a sum reaching a product (a Linear layer's output summed) is an expanded view
    of the grad_output handed to the product, not a tensor written first: one step, the
    product."""
    x = rand((6, 4), gen).requires_grad_(True)
    w = rand((3, 4), gen).requires_grad_(True)
    y = torch.nn.functional.linear(x, w).sum()
    report = fastgrad.explain(y, x)
    assert report.regions == [r for r in report.regions if "torch.mm" in r], str(report)
    assert report.kernel_launches == 1, str(report)
    assert_same(fastgrad.grad(y, x, retain_graph=True), TORCH_GRAD(y, x))


def test_a_weight_gradient_is_one_product(gen):
    """A Linear's weight gradient goes through the transpose PyTorch saved (W.T): the product
    is written transposed ((a @ b).T = b.T @ a.T), not computed and then copied."""
    x = rand((6, 4), gen).requires_grad_(True)
    w = rand((3, 4), gen).requires_grad_(True)
    y = torch.tanh(torch.nn.functional.linear(x, w))
    go = rand((6, 3), gen)
    report = fastgrad.explain(y, w, go)
    assert sum("torch.mm" in r for r in report.regions) == 1, str(report)
    assert report.kernel_launches == 2, str(report)  # the tanh region, the product
    assert_same(fastgrad.grad(y, w, go, retain_graph=True), TORCH_GRAD(y, w, go))

