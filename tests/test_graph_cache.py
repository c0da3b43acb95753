"""The graph signature cache (python/fastgrad/graph_cache.py).

A graph whose signature matches one seen before reuses that call's derived expressions, so the
signature must tell apart every pair of graphs that need different ones. Each pair below has the
same node classes and edges and differs in one thing lowering reads (a saved scalar, a layout, a
dtype, which saved tensors are the same tensor, ...). The first graph fills the cache, the second
must still match torch.
"""
import pytest
import torch

import fastgrad
from fastgrad import graph_cache

from conftest import TORCH_GRAD, Twice, assert_same, check_grad, rand


def _const(gen, shape=(3, 4)):
    return rand(shape, gen)


PAIRS = {
    "pow_exponent": (lambda g: (lambda x: x ** 2, [rand((3, 4), g)]),
                     lambda g: (lambda x: x ** 3, [rand((3, 4), g)])),
    "sum_dim": (lambda g: (lambda x: x.sum(0), [rand((3, 3), g)]),
                lambda g: (lambda x: x.sum(1), [rand((3, 3), g)])),
    "softmax_dim": (lambda g: (lambda x: torch.softmax(x, 0), [rand((3, 3), g)]),
                    lambda g: (lambda x: torch.softmax(x, 1), [rand((3, 3), g)])),
    "select_index": (lambda g: (lambda x: x[:, 0], [rand((3, 3), g)]),
                     lambda g: (lambda x: x[:, 2], [rand((3, 3), g)])),
    "clamp_bound": (lambda g: (lambda x: x.clamp(min=0.0), [rand((3, 4), g)]),
                    lambda g: (lambda x: x.clamp(min=0.5), [rand((3, 4), g)])),
    "shape": (lambda g: (lambda x: torch.sin(x) * x, [rand((3, 4), g)]),
              lambda g: (lambda x: torch.sin(x) * x, [rand((4, 3), g)])),
    "broadcast_shape": (lambda g: (lambda x, y: x * y, [rand((3, 4), g), rand((3, 4), g)]),
                        lambda g: (lambda x, y: x * y, [rand((3, 4), g), rand((4,), g)])),
    "add_broadcast": (lambda g: (lambda x, y: x + y, [rand((3, 4), g), rand((3, 4), g)]),
                      lambda g: (lambda x, y: x + y, [rand((3, 4), g), rand((4,), g)])),
    "dtype": (lambda g: (lambda x: torch.exp(x) * x, [rand((3, 4), g)]),
              lambda g: (lambda x: torch.exp(x) * x, [rand((3, 4), g, dtype=torch.float32)])),
    "saved_dims_list": (lambda g: (lambda x: x.permute(1, 0, 2).sin(), [rand((3, 3, 3), g)]),
                        lambda g: (lambda x: x.permute(0, 2, 1).sin(), [rand((3, 3, 3), g)])),
    "strides": (lambda g: (lambda x: torch.tanh(x) * x, [rand((3, 4), g)]),
                lambda g: (lambda x: torch.tanh(x.t()) * x.t(), [rand((4, 3), g)])),
    # saved values of the kinds the key writes by value (csrc/signature_key.h): a bool, an int
    # against a float, an int tuple
    "saved_bool": (lambda g: (lambda x: x.sum(1, keepdim=True) * x, [rand((3, 4), g)]),
                   lambda g: (lambda x: x.sum(1).unsqueeze(1) * x, [rand((3, 4), g)])),
    "saved_int_vs_float": (lambda g: (lambda x: x ** 2, [rand((3, 4), g)]),
                           lambda g: (lambda x: x ** 2.5, [rand((3, 4), g).abs() + 0.5])),
    "saved_int_tuple": (lambda g: (lambda x: x.sum((0, 1)), [rand((3, 3, 2), g)]),
                        lambda g: (lambda x: x.sum((0, 2)), [rand((3, 3, 2), g)])),
    # only the node class differs (in the key: its number in the intern table)
    "node_class": (lambda g: (lambda x: torch.sin(x) * x, [rand((3, 4), g)]),
                   lambda g: (lambda x: torch.cos(x) * x, [rand((3, 4), g)])),
}


def _aliased(g):
    c = _const(g)
    return (lambda x: x * c * c), [rand((3, 4), g)]


def _distinct(g):
    c, d = _const(g), _const(g)
    return (lambda x: x * c * d), [rand((3, 4), g)]


def _baddbmm_bias(shape):
    # baddbmm runs through PyTorch (a fallback node); its bias edge leaves the walk, and only
    # that edge's metadata differs between the two graphs (the sweep does not read it)
    def build(g):
        b, w = rand(shape, g).requires_grad_(True), rand((2, 4, 3), g).requires_grad_(True)
        return (lambda x: torch.tanh(torch.baddbmm(b, x, w))), [rand((2, 5, 4), g)]
    return build


PAIRS["fallback_external_edge"] = (_baddbmm_bias((3,)), _baddbmm_bias((1, 3)))
PAIRS["saved_tensor_aliasing"] = (_aliased, _distinct)
PAIRS["saved_tensor_aliasing_reverse"] = (_distinct, _aliased)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("orders", [1, 2])
def test_same_structure_different_graphs(name, orders, gen):
    graph_cache.clear()
    for build in PAIRS[name]:
        fn, inputs = build(gen)
        check_grad(fn, inputs, gen=gen, orders=orders)


def test_grad_outputs_layout(gen):
    graph_cache.clear()
    x = rand((3, 4), gen).requires_grad_(True)
    y = torch.sin(x)
    for go in (rand((3, 4), gen), rand((4,), gen).expand(3, 4), rand((4, 3), gen).t()):
        assert_same(fastgrad.grad(y, x, go, retain_graph=True),
                    TORCH_GRAD(y, x, go, retain_graph=True))


def test_repeated_structure_is_a_hit(gen):
    """Fresh graphs of one structure reuse one entry (and give each graph's own values)."""
    graph_cache.clear()
    for _ in range(4):
        x = rand((5, 2), gen).requires_grad_(True)
        y = (torch.sin(x) * torch.exp(x)).sum()
        assert_same(fastgrad.grad(y, x, retain_graph=True), TORCH_GRAD(y, x))
    assert len(graph_cache._ENTRIES) == 1


def test_saved_zero_sign_is_part_of_the_key(gen):
    """0.0 == -0.0, but with `alpha=-0.0` add's gradient is -0.0 where it is 0.0 with
    `alpha=0.0`: the key writes a saved float (add's alpha) by its bits, so the second graph
    does not reuse the first's plan."""
    graph_cache.clear()
    z = rand((3, 4), gen)
    for c in (0.0, -0.0, 0.0):
        x = rand((3, 4), gen).requires_grad_(True)
        y = torch.add(z, torch.exp(x), alpha=c).sum()
        (a,) = fastgrad.grad(y, x, retain_graph=True)
        (e,) = TORCH_GRAD(y, x)
        assert torch.equal(torch.signbit(a), torch.signbit(e)), c


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_keys_made_before_a_clear_never_match(dtype, gen, monkeypatch):
    """Keys number node classes, dtypes and devices from an intern table; clearing it (as
    every store does here) must not hand a number to another object, or the key stored just
    after a clear (sin's graph) would match the next graph's (cos's: only the class
    differs)."""
    from fastgrad import _C
    monkeypatch.setattr(graph_cache, "_MAX_INTERNED", 0)
    graph_cache.clear()
    assert _C.interned_count() == 0
    for f in (torch.sin, torch.cos, torch.sin, torch.cos):
        x = rand((3, 4), gen, dtype=dtype).requires_grad_(True)
        y = (f(x) * x).sum()
        assert_same(fastgrad.grad(y, x, retain_graph=True), TORCH_GRAD(y, x), f.__name__)


def test_node_metadata_parts_kept_in_the_node_give_the_same_key(gen):
    """The signature keeps each node's input-metadata key parts in ``node.metadata``: a key
    made from kept parts equals one made from ``_input_metadata`` itself (a new graph of the
    same structure), also after an intern-table clear, which makes the kept parts (numbered
    in the generation before) be made anew."""
    from fastgrad import _C, engine

    def graph():
        x = rand((3, 4), gen).requires_grad_(True)
        w = rand((4, 2), gen).requires_grad_(True)  # an edge leaving the walk: its parts too
        return torch.tanh(x @ w).sum(), x

    def key(y, x):
        gos = _C.plain_grads([y], None)
        return engine._capture([(y.grad_fn, 0)], gos, [x], False).key

    graph_cache.clear()
    y, x = graph()
    first = key(y, x)
    assert "fastgrad_signature_meta" in y.grad_fn.metadata
    assert key(y, x) == first == key(*graph())
    graph_cache.clear()
    again = key(y, x)
    assert again != first and again == key(*graph()) == key(y, x)
    assert_same(fastgrad.grad(y, x, retain_graph=True), TORCH_GRAD(y, x, retain_graph=True))


@pytest.mark.parametrize("alpha", [0.5, -0.0])
def test_node_saved_values_kept_in_the_node_give_the_same_key(alpha, gen):
    """A node's saved values that are not tensors (add's alpha, addmm's sizes and strides,
    sum's dims) are fixed when PyTorch creates the node: the signature keeps their key bytes in
    ``node.metadata`` and then reads only the node's tensors. A key made from kept values equals
    one made anew (a new graph of the same structure), also after an intern-table clear; a
    graph whose values differ gets another key."""
    from fastgrad import _C, engine

    def graph(a):
        x = rand((3, 4), gen).requires_grad_(True)
        lin = torch.nn.Linear(4, 5).double()
        return torch.add(lin(x), torch.exp(lin(x)), alpha=a).sum(1).sum(), x

    def key(y, x):
        gos = _C.plain_grads([y], None)
        return engine._capture([(y.grad_fn, 0)], gos, [x], False).key

    graph_cache.clear()
    y, x = graph(alpha)
    first = key(y, x)
    kept = [n for n in (y.grad_fn, y.grad_fn.next_functions[0][0])
            if "fastgrad_signature_values" in n.metadata]
    assert len(kept) == 2  # (the two sums: their input sizes, the dims of one)
    assert key(y, x) == first == key(*graph(alpha))
    assert key(*graph(0.25)) != first
    graph_cache.clear()
    again = key(y, x)
    assert again != first and again == key(*graph(alpha)) == key(y, x)
    assert_same(fastgrad.grad(y, x, retain_graph=True), TORCH_GRAD(y, x, retain_graph=True))


def test_explain_on_a_hit_reports_the_nodes(gen):
    graph_cache.clear()
    x = rand((5,), gen).requires_grad_(True)
    y = torch.cos(x).sum()
    first = fastgrad.explain(y, x)
    second = fastgrad.explain(y, x)
    assert second.native == first.native == ["SumBackward0", "CosBackward0"]
    assert second.kernel_launches == first.kernel_launches == 1


def test_freed_graph_raises_on_a_hit(gen):
    graph_cache.clear()
    x = rand((4,), gen).requires_grad_(True)
    y = torch.exp(x).sum()
    fastgrad.grad(y, x)  # frees (retain_graph=False)
    with pytest.raises(RuntimeError) as got:
        fastgrad.grad(y, x)
    x2 = rand((4,), gen).requires_grad_(True)
    y2 = torch.exp(x2).sum()
    TORCH_GRAD(y2, x2)
    with pytest.raises(RuntimeError) as ref:
        TORCH_GRAD(y2, x2)
    assert str(got.value) == str(ref.value)


@pytest.mark.parametrize("create_graph", [False, True])
def test_fallback_graphs_replay(create_graph, gen):
    """A graph with fallback nodes is cached too: a hit runs those nodes again on the new
    graph's cotangents (values must be the new graph's)."""
    graph_cache.clear()
    for _ in range(3):
        w = rand((2, 3, 3), gen)
        x = rand((2, 4, 3), gen).requires_grad_(True)
        y = torch.tanh(torch.cumsum(torch.bmm(torch.sin(x), w), 1)).sum()
        got = fastgrad.grad(y, x, retain_graph=True, create_graph=create_graph)
        assert_same(got, TORCH_GRAD(y, x, retain_graph=True))
        report = fastgrad.explain(y, x)
        assert {n for n, _ in report.fallback} == {"CumsumBackward0", "BmmBackward0"}
    # one entry per create_graph value (explain runs without it)
    assert len(graph_cache._ENTRIES) == (2 if create_graph else 1)


class _Layout(torch.autograd.Function):
    """Identity whose backward returns a contiguous or a transposed-layout gradient."""
    transposed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.t().contiguous().t() if _Layout.transposed else g.contiguous()


def test_replay_with_a_different_result_layout(gen):
    """Same signature, but the fallback node returns another layout: derive anew."""
    graph_cache.clear()
    try:
        for transposed in (False, True, False):
            _Layout.transposed = transposed
            x = rand((3, 4), gen).requires_grad_(True)
            y = (torch.exp(_Layout.apply(torch.sin(x))) * 2).sum()
            assert_same(fastgrad.grad(y, x, retain_graph=True), TORCH_GRAD(y, x))
    finally:
        _Layout.transposed = False


def test_ir_table_is_bounded(gen, monkeypatch):
    """Many graphs of new shapes: the interned IR is forgotten between calls once over the
    limit, and results stay right across the reset (with create_graph, through regions made
    before it)."""
    from fastgrad import engine, ir
    monkeypatch.setattr(engine, "IR_TABLE_LIMIT", 50)
    keep = []
    for n in range(2, 12):
        x = rand((n,), gen).requires_grad_(True)
        y = (torch.sin(x) * torch.exp(x)).sum()
        g = fastgrad.grad(y, x, create_graph=True)
        keep.append((x, g))
        assert ir.table_size() < 50 + 200
    for x, g in keep:  # second derivatives through regions built before resets
        xr = x.detach().clone().requires_grad_(True)
        (gr,) = TORCH_GRAD((torch.sin(xr) * torch.exp(xr)).sum(), xr, create_graph=True)
        assert_same(fastgrad.grad(g[0].sum(), x), TORCH_GRAD(gr.sum(), xr))


def _fresh_x(gen):
    return rand((3,), gen).requires_grad_(True)


FREED_CASES = {
    # no saved tensors at all: PyTorch lets the graph run again
    "no_saved_tensors": lambda G, x: (G((x + x).sum(), x), G((x + x).sum(), x))[1],
    # the input's own node is never run, so nothing of it is freed
    "input_node_not_run": lambda G, x: (lambda y: (G((y * 3).sum(), y),
                                                   G((y * 3).sum(), y))[1])(x.exp()),
    "later_call_through_input_node": lambda G, x: (lambda y: (G((y * 3).sum(), y),
                                                              G(y.sum(), x))[1])(x.exp()),
    # saved tensors freed: both raise PyTorch's error
    "saved_tensors_freed": lambda G, x: (lambda z: (G(z, x), G(z, x))[1])((x.exp() ** 2).sum()),
    # ... whichever engine runs the graph again, and reading a saved tensor too
    "freed_then_torch": lambda G, x: (lambda z: (G(z, x), TORCH_GRAD(z, x))[1])(
        (x.exp() ** 2).sum()),
    "freed_then_saved_read": lambda G, x: (lambda y: (G(y.sum(), x), y.grad_fn._saved_result)[1])(
        x.exp()),
    # a saved value None (x * 3.0 saves no `self`) next to a saved tensor
    "saved_none_and_tensor": lambda G, x: (lambda z: (G(z, x), G(z, x))[1])(
        (torch.sin(x) * 3.0).sum()),
    # a Python Function's saved tensors
    "python_function_freed": lambda G, x: (lambda z: (G(z, x), TORCH_GRAD(z, x))[1])(
        _SaveInput.apply(x).sum()),
    # forward under saved-tensor hooks (they own the saved tensors): the node refuses instead
    "saved_tensor_hooks_freed": lambda G, x: (lambda z: (G(z, x), TORCH_GRAD(z, x))[1])(
        _under_hooks(lambda: (x.exp() ** 2).sum())),
    # nodes that saved nothing (a Python Function saving no tensor, addcmul of constants) may
    # run again in PyTorch
    "python_function_saving_nothing": lambda G, x: (lambda z: (G(z, x), G(z, x))[1])(
        Twice.apply(x).sum()),
    "addcmul_saving_nothing": lambda G, x: (lambda z: (G(z, x), G(z, x))[1])(
        torch.addcmul(x, torch.ones_like(x) * 2, torch.ones_like(x) * 3).sum()),
    # a matrix product that saved one side only, then torch's engine on it
    "mm_one_side_freed": lambda G, x: (lambda z: (G(z, x), TORCH_GRAD(z, x))[1])(
        x[:, None].mm(torch.ones(1, 2, dtype=x.dtype)).sum()),
}



class _SaveInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return 2 * a * g


def _under_hooks(build):
    """``build()`` under saved-tensor hooks pushed as if before fastgrad was imported (it does
    not see them then: it runs the graph itself, and must refuse its nodes itself when it
    frees it; seen, the graph goes to PyTorch whole, test_saved_hooks.py)."""
    from fastgrad import hooks
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = build()
    hooks._STATE["saved"] = False
    return out


@pytest.mark.parametrize("name", list(FREED_CASES))
def test_freed_graphs_like_torch(name, gen):
    x0 = rand((3,), gen)
    outcomes = []
    for G in (TORCH_GRAD, fastgrad.grad):
        try:
            outcomes.append(("ok", FREED_CASES[name](G, x0.clone().requires_grad_(True))))
        except RuntimeError as e:
            outcomes.append(("error", str(e)))
    (rk, rv), (fk, fv) = outcomes
    assert fk == rk, outcomes
    if rk == "ok":
        assert_same(fv, rv)
    else:
        assert fv == rv


def test_view_result_is_not_attached_to_grad_outputs(gen):
    """create_graph=False: the expanded view result does not carry the grad_output's graph."""
    x = rand((3, 2), gen).requires_grad_(True)
    go = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (r,) = fastgrad.grad(x.sum(), x, go)
    assert r.grad_fn is None
    with pytest.raises(RuntimeError):
        TORCH_GRAD(r.sum(), go)


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)

# name -> x -> (output, the tensors whose storages the graph saved)
RELEASE_CASES = {
    "saved_result": lambda x: (lambda y: (y.sum(), [y]))(torch.exp(x)),
    "saved_inputs": lambda x: (lambda a, b: ((a * b).sum(), [a, b]))(torch.sin(x), torch.cos(x)),
    "saved_twice": lambda x: (lambda a: ((a * a).sum(), [a]))(torch.sin(x)),
    "python_function": lambda x: (lambda a: (_SaveInput.apply(a).sum(), [a]))(torch.sin(x)),
    # an index list with an empty slot ([None, idx]: x[:, idx]) still frees idx
    "index_list": lambda x: (lambda a, i: (a[:, i].sum(), [i]))(
        torch.exp(x).reshape(2, 2), torch.tensor([1, 0])),
}


def _users(ts):
    """Users of each tensor and of its storage (a saved input holds the tensor, a saved
    output a tensor of its own on the same storage)."""
    return [(t._use_count(), _USE_COUNT(t.untyped_storage()._cdata)) for t in ts]


@pytest.mark.skipif(_USE_COUNT is None or not hasattr(torch.Tensor, "_use_count"),
                    reason="torch's use counts are not readable")
@pytest.mark.parametrize("name", list(RELEASE_CASES))
def test_a_freed_graph_lets_its_saved_tensors_go_like_torch(name, gen):
    """retain_graph=False frees what the nodes saved, as PyTorch's engine does: afterwards the
    saved tensors' storages have as many users as after torch.autograd.grad."""
    x0 = rand((4,), gen)
    counts = []
    for G in (TORCH_GRAD, fastgrad.grad):
        for _ in range(2):  # the second time on a cache hit
            x = x0.clone().requires_grad_(True)
            out, kept = RELEASE_CASES[name](x)
            before = _users(kept)
            G(out, x)
            counts.append((before, _users(kept)))
    assert counts[2] == counts[3] == counts[0], counts
    assert counts[0][1] != counts[0][0]  # (the check can fail: torch did free something)


def test_freeing_under_saved_tensor_hooks_does_not_unpack(gen, monkeypatch):
    """A forward run under saved_tensors_hooks: retain_graph=False refuses the nodes (their
    saved tensors belong to the hooks) without calling the unpack hook while freeing; a rerun
    by torch then raises torch's error."""
    from fastgrad import engine, hooks
    n = {"unpack": 0, "freeing": 0}
    real = engine._mark_freed

    def counting(graph):
        before = n["unpack"]
        real(graph)
        n["freeing"] += n["unpack"] - before

    monkeypatch.setattr(engine, "_mark_freed", counting)

    def unpack(t):
        n["unpack"] += 1
        return t
    for _ in range(2):  # (the second on a cache hit)
        x = rand((5, 4), gen).requires_grad_(True)
        w = rand((3, 4), gen).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            y = torch.tanh(torch.nn.functional.linear(x, w)).sum()
        hooks._STATE["saved"] = False  # (as if pushed before the import: fastgrad runs it)
        fastgrad.grad(y, x)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            TORCH_GRAD(y, x)
    assert n["freeing"] == 0 and n["unpack"] > 0


def test_the_binder_holds_only_tensors_it_numbers(gen):
    """A call's binder keeps each tensor it numbered (so a tensor met again skips its reads),
    but not one the compiled path cannot read (a complex one: the call goes to PyTorch, whose
    engine frees such saved tensors as it goes, which a reference held here would prevent)."""
    import weakref
    from fastgrad import engine
    b = engine._Binder()
    z, x = torch.randn(3, dtype=torch.complex64), rand((3,), gen)
    zr, xr = weakref.ref(z), weakref.ref(x)
    assert b.index(z) == (None, None)
    n, key = b.index(x)
    assert b.index(x) == (n, key) and len(b.tensors) == 1
    del z, x
    assert zr() is None and xr() is not None
