"""fastgrad.churn: graphs whose signature changes every call go to PyTorch, others are planned.

Each test checks both what ran (PyTorch's engine, counted through api._torch_grad, or fastgrad's
plan: explain's report) and that every result equals torch.autograd.grad's in float64."""
import pytest
import torch

import fastgrad
from fastgrad import api, churn, engine, graph_cache, jit, plan, sweep

from conftest import TORCH_GRAD, assert_same

GRAPHS = {
    # name: forward from x, create_graph pipeline (second order) or first order
    "pinn": (2, lambda x, net: net(x).sum()),
    "tanh_cube": (1, lambda x, net: (torch.tanh(x) ** 3).sum()),
}


@pytest.fixture
def routing(monkeypatch):
    """Routing on (the suite turns it off), fresh records and caches; counts the calls handed
    to PyTorch's torch.autograd.grad by api.py."""
    monkeypatch.setattr(churn, "MISSES", 4)
    churn.clear()
    graph_cache.clear()
    plan.clear_plan_cache()
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return TORCH_GRAD(*a, **k)

    monkeypatch.setattr(api, "_torch_grad", counting)
    yield calls
    churn.clear()


def _net(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
                               ).double()


def _points(n, gen):
    return torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1


def _step(grad, name, x0, net):
    """The graph's pipeline with ``grad``: u_x (create_graph) and u_xx of u_x[:, 0] for the
    second-order graphs, the gradient for the first-order ones; fresh leaves."""
    order, f = GRAPHS[name]
    x = x0.clone().requires_grad_(True)
    u = f(x, net)
    g = grad(u, x, create_graph=order > 1)[0]
    if order == 1:
        return (g,)
    return g.detach(), grad(g[:, 0].sum(), x)[0]


def _check(name, n, gen, net):
    x0 = _points(n, gen)
    ref = _step(TORCH_GRAD, name, x0, net)
    got = _step(fastgrad.grad, name, x0, net)
    assert_same(got, ref, what=f"{name} n={n}", rtol=1e-10, atol=1e-12)


def _explain(name, n, gen, net):
    """explain's report of the graph's first call at n points."""
    order, f = GRAPHS[name]
    x = _points(n, gen).requires_grad_(True)
    return fastgrad.explain(f(x, net), x, create_graph=order > 1)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_shapes_new_every_call_go_to_pytorch_after_the_first_misses(routing, name, gen):
    net = _net(gen)
    order = GRAPHS[name][0]
    for i in range(churn.MISSES):
        _check(name, 40 + i, gen, net)
    # the first calls of each structure were planned: PyTorch ran only the references
    assert len(routing) == 0
    for i in range(20):
        _check(name, 60 + i, gen, net)
    # every later call of the first structure went to PyTorch (for second order, whose second
    # call then differentiates PyTorch's graph, a new structure: its first misses are planned)
    assert len(routing) >= 20 * order - churn.MISSES
    rep = _explain(name, 200, gen, net)
    assert not rep.all_native
    assert rep.fallback == [("<whole call>", churn.REASON)]


def test_a_graph_whose_shape_settles_is_planned_again(routing, monkeypatch, gen):
    net = _net(gen)
    for i in range(12):
        _check("pinn", 40 + i, gen, net)
    assert routing, "the structure should churn by now"
    # one shape from now on: within a few probes its signature is seen twice, planned, hit
    for _ in range(4 * churn.PROBE):
        _check("pinn", 500, gen, net)
    before = len(routing)
    for _ in range(2 * churn.PROBE):
        _check("pinn", 500, gen, net)
    assert len(routing) == before
    rep = _explain("pinn", 500, gen, net)
    assert rep.all_native, str(rep)
    # no record waits now: both calls of a step run from their plans in C++ again
    assert churn._WAITING[0] == 0
    repeated = _repeated(monkeypatch)
    _check("pinn", 500, gen, net)
    assert repeated == [True, True]


def test_shapes_that_cycle_end_up_planned(routing, gen):
    net = _net(gen)
    sizes = [30 + 7 * k for k in range(6)]
    for _ in range(12):
        for n in sizes:
            _check("tanh_cube", n, gen, net)
    before = len(routing)
    for n in sizes * 3:
        _check("tanh_cube", n, gen, net)
    assert len(routing) == before


@pytest.mark.parametrize("name", list(GRAPHS))
def test_counts_that_recur_are_planned_at_their_second_sight(routing, name, gen):
    """A cycle of counts longer than the probes cover: a structure's calls go unsigned between
    probes, yet each count whose given shapes come back is signed and planned (Record.shapes),
    so after three cycles every call runs from its plan (a PINN step's second call meets a
    new structure once its first is planned)."""
    net = _net(gen)
    sizes = [30 + 5 * k for k in range(24)]
    for _ in range(3):
        for n in sizes:
            _check(name, n, gen, net)
    assert routing, "the structure should have churned"
    before = len(routing)
    for n in sizes:
        _check(name, n, gen, net)
    assert len(routing) == before
    assert _explain(name, sizes[7], gen, net).all_native


def test_given_shapes_whose_signatures_vary_follow_the_probes(routing, monkeypatch, gen):
    """Fixed points, a number of rows used that changes every call (a neighbour list under
    fixed positions): the given shapes predict nothing, so they are marked _VARIES at their
    first signature that differs and cost no plan; the calls go to PyTorch between probes."""
    planned = []
    real = sweep.sweep
    monkeypatch.setattr(sweep, "sweep", lambda *a, **k: (planned.append(1), real(*a, **k))[1])
    x0 = _points(200, gen)
    for i in range(40):
        k = 50 + i
        x, xr = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        assert_same(fastgrad.grad((torch.tanh(x[:k]) ** 3).sum(), x),
                    TORCH_GRAD((torch.tanh(xr[:k]) ** 3).sum(), xr), rtol=1e-12, atol=1e-12)
    assert len(planned) == churn.MISSES  # (the misses before the structure churned)
    rec, = [r for r in churn._RECORDS.values() if r.shapes]
    assert list(rec.shapes.values()) == [churn._VARIES]
    assert len(routing) == 40 - churn.MISSES


def test_records_remember_given_shapes_up_to_their_limit(routing):
    r = churn.Record()
    t = lambda n: torch.zeros(n, 2)  # noqa: E731
    for k in range(churn.MISSES):
        assert not churn.route(r, ("new", k), [], [t(1)])
    assert r.churns() and r.wait == 0 and r.shapes == {}  # (recorded once churning only)
    assert churn.route(r, ("new", 99), [], [t(2)])  # routed, its shapes remembered
    assert r.shapes[((torch.Size([2, 2]), torch.float32),)] == hash(("new", 99))
    for k in range(churn.PROBE):
        churn.route(r, ("newer", k), [], [t(100 + k)])
    assert r.wait > 0
    assert r.skip([t(3)])  # unsigned: never given these shapes
    assert not r.skip([t(3)])  # given them again: signed
    assert not churn.route(r, ("third",), [], [t(3)])  # and planned: their second sight
    assert not r.skip([t(2)]) and not churn.route(r, ("new", 99), [], [t(2)])
    for k in range(3 * churn.SHAPES):
        churn.route(r, ("many", k), [], [t(200 + k)])
    assert len(r.shapes) == churn.SHAPES
    # no tensor given (inputs that are edges, a scalar output): nothing to remember
    assert churn._shape_key([None]) is None and churn._shape_key([]) is None


def _repeated(monkeypatch):
    """From now on, for each call: whether _C.repeat_call ran it (from its plan, in C++)."""
    repeated = []
    real = fastgrad._C.repeat_call

    def spy(*a):
        r = real(*a)
        repeated.append(r is not None and r[0] is not None)
        return r

    monkeypatch.setattr(fastgrad._C, "repeat_call", spy)
    return repeated


def test_a_structure_left_churning_does_not_slow_the_others(routing, monkeypatch, gen):
    """A structure whose record still sends calls to PyTorch unsigned (its graph abandoned
    mid-churn) leaves the other graphs' calls to run from C++ (_C.repeat_call looks up the
    call's own record, as engine._capture does)."""
    net = _net(gen)
    x0 = _points(50, gen)

    def other():  # another structure, cached
        x = x0.clone().requires_grad_(True)
        assert_same(fastgrad.grad(net(x).sum(), x), TORCH_GRAD(net(x).sum(), x))

    for _ in range(churn.WINDOW + 1):  # (its record's miss bit cleared by hits)
        other()
    for i in range(12):
        _check("tanh_cube", 40 + i, gen, net)
    assert churn._WAITING[0] > 0, "the churning structure should be waiting"
    routed = len(routing)
    repeated = _repeated(monkeypatch)
    for _ in range(3):
        other()
    assert repeated == [True] * 3 and len(routing) == routed
    _check("tanh_cube", 90, gen, net)  # the churning one's next call still goes to PyTorch
    assert len(routing) == routed + 1


def test_clearing_records_leaves_no_record_waiting(routing):
    r = churn.record(1, 1, 1, False)
    r._wait(3)
    assert churn._WAITING[0] == 1
    churn.clear()
    assert churn._WAITING[0] == 0
    r.hit()  # (a cache entry may still hold it)
    assert churn._WAITING[0] == 0


def test_a_record_whose_structure_is_no_longer_called_stops_waiting(routing):
    r = churn.record(1, 1, 1, False)
    r._wait(3)
    for _ in range(churn.IDLE):  # other structures' calls, looked up while r waits
        assert churn.find(2, 1, 1, False) is None
    assert churn.find(1, 1, 1, False) is r  # r's own call: the count starts again
    for _ in range(churn.IDLE):
        churn.find(2, 1, 1, False)
    assert r.wait == 3 and churn._WAITING[0] == 1
    churn.find(2, 1, 1, False)
    assert r.wait == 0 and churn._WAITING[0] == 0


def test_a_cached_graph_with_a_new_shape_now_and_then_is_never_routed(routing, gen):
    net = _net(gen)
    for i in range(40):
        n = 100 if i % 5 else 100 + i  # a new shape one call in five
        _check("pinn", n, gen, net)
    assert len(routing) == 0


def test_large_calls_are_planned_even_when_shapes_churn(routing, monkeypatch, gen):
    monkeypatch.setitem(churn.ROUTE_NUMEL, "cpu", 64)  # every call here binds a larger tensor
    net = _net(gen)
    for i in range(16):
        _check("pinn", 40 + i, gen, net)
    assert len(routing) == 0
    assert _explain("pinn", 90, gen, net).all_native


def test_a_large_call_of_a_churning_structure_is_never_routed(routing, monkeypatch, gen):
    # small calls of new shapes make the structure churn; a large one of a fixed shape in
    # between is signed (and hits its plan) even while the small ones go unsigned
    monkeypatch.setitem(churn.ROUTE_NUMEL, "cpu", 256)
    sizes = []
    real = api._torch_grad

    def recording(outputs, inputs, *a, **k):
        sizes.append(inputs[0].numel() if isinstance(inputs, tuple) else inputs.numel())
        return real(outputs, inputs, *a, **k)

    monkeypatch.setattr(api, "_torch_grad", recording)
    net, n = _net(gen), 0
    for _ in range(8):
        for _ in range(5):
            n += 1
            _check("tanh_cube", 20 + n % 97, gen, net)  # 2 * (20..116) elements: small
        _check("tanh_cube", 300, gen, net)  # 600 elements
    assert sizes and max(sizes) < 256, sizes


def test_a_call_whose_activations_are_large_is_signed_though_its_points_are_few(
        routing, monkeypatch, gen):
    # a PINN binds [N, 16] activations for [N, 2] points: between probes, a call is judged by
    # its points times the ratio its structure's signed calls showed (Record.scale)
    monkeypatch.setitem(churn.ROUTE_NUMEL, "cpu", 640)  # 40 points' activations
    rows = []
    real = api._torch_grad

    def recording(outputs, inputs, *a, **k):
        rows.append((inputs[0] if isinstance(inputs, tuple) else inputs).shape[0])
        return real(outputs, inputs, *a, **k)

    monkeypatch.setattr(api, "_torch_grad", recording)
    net = _net(gen)
    for k in range(12):
        for n in (5 + k, 8 + k, 11 + k, 14 + k, 60 + k):  # small ones, then a large one
            _check("pinn", n, gen, net)
    assert rows and max(rows) < 40, rows


def test_routing_off(routing, monkeypatch, gen):
    monkeypatch.setattr(churn, "MISSES", 0)
    net = _net(gen)
    for i in range(16):
        _check("tanh_cube", 40 + i, gen, net)
    assert len(routing) == 0


def test_a_routed_call_raises_pytorchs_errors(routing, gen):
    net = _net(gen)
    for i in range(12):
        _check("tanh_cube", 40 + i, gen, net)
    assert routing
    x = _points(77, gen).requires_grad_(True)
    y = (torch.tanh(x) ** 3).sum()
    fastgrad.grad(y, x)  # (routed: PyTorch's engine frees the graph)
    with pytest.raises(RuntimeError) as fe:
        fastgrad.grad(y, x)
    x = _points(78, gen).requires_grad_(True)
    y = (torch.tanh(x) ** 3).sum()
    TORCH_GRAD(y, x)
    with pytest.raises(RuntimeError) as te:
        TORCH_GRAD(y, x)
    assert str(fe.value) == str(te.value)


def test_structure_ignores_shapes_and_tells_classes_apart():
    def graph(f, n):
        x = torch.rand(n, requires_grad=True)
        out = f(x)
        return engine._collect([out.grad_fn], set(), {id(x)}).structure

    assert graph(lambda x: x.sin().sum(), 5) == graph(lambda x: x.sin().sum(), 9)
    assert graph(lambda x: x.sin().sum(), 5) != graph(lambda x: x.cos().sum(), 5)
    assert graph(lambda x: x.sin().exp().sum(), 5) != graph(lambda x: x.exp().sin().sum(), 5)


def test_records_count_signed_calls_only(routing):
    r = churn.Record()
    # the first MISSES misses are planned; from then on a new signature is routed
    assert [churn.route(r, ("new", k), []) for k in range(churn.WINDOW)] == \
        [False] * churn.MISSES + [True] * (churn.WINDOW - churn.MISSES)
    assert r.churns()
    # the k-th new signature routed in a row lets k - 1 calls (at most PROBE - 1) go unsigned
    fresh = churn.WINDOW - churn.MISSES
    assert r.fresh == fresh
    assert [r.skip([]) for _ in range(fresh)] == [True] * (fresh - 1) + [False]
    assert churn._WAITING[0] == 0  # (no record waits: calls need not look theirs up)
    for k in range(churn.PROBE):
        assert churn.route(r, ("newer", k), [])
    assert churn._WAITING[0] == 1
    assert [r.skip([]) for _ in range(churn.PROBE)] == [True] * (churn.PROBE - 1) + [False]
    assert churn._WAITING[0] == 0
    for k in range(churn.PROBE):
        assert churn.route(r, ("newest", k), [])
    assert not r.skip([torch.zeros(churn.ROUTE_NUMEL["cpu"])])  # a large input is signed
    assert r.skip([])
    key = ("again",)
    assert churn.route(r, key, [])
    r.hit()
    assert not r.skip([])  # after a hit the next call is signed too
    assert not churn.route(r, key, [])  # a routed signature seen again is planned
    assert not churn.route(r, ("large",), [torch.zeros(churn.ROUTE_NUMEL["cpu"])])
    for _ in range(churn.WINDOW - churn.MISSES + 1):
        r.hit()
    assert not r.churns()


@pytest.mark.skipif(not jit.status()["enabled"], reason="FASTGRAD_JIT=0")
def test_a_churning_graph_too_large_to_route_compiles_its_loops_at_once(routing, monkeypatch,
                                                                        gen):
    # planned anew for every shape, it never runs jit.AFTER times: its loops are compiled on
    # the first run of the second plan made while it churns, and serve the shapes after it
    monkeypatch.setitem(churn.ROUTE_NUMEL, "cpu", 64)
    c = 1.5 + float(torch.rand((), generator=gen))  # (a literal in the loop: a new source)
    fn = lambda x: ((torch.sin(x) + 2) ** c).sum()  # noqa: E731  (x * c would load c)

    def explain(n):
        x = _points(n, gen).requires_grad_(True)
        return str(fastgrad.explain(fn(x), x))

    # (the call that makes MISSES misses already churns)
    before = [explain(40 + i) for i in range(churn.MISSES - 1)]
    assert not any("compiled loop" in r for r in before), before
    # the first such plan meets its loop's source, the second compiles it, the next load it
    after = [explain(50 + i) for i in range(4)]
    assert ["compiled loop" in r for r in after] == [False, True, True, True], after
    assert len(routing) == 0
    for i in range(3):
        x0 = _points(60 + i, gen)
        x, xr = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        assert_same(fastgrad.grad(fn(x), x), TORCH_GRAD(fn(xr), xr), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not jit.status()["enabled"], reason="FASTGRAD_JIT=0")
def test_a_churning_graph_whose_rows_change_length_compiles_no_loop_per_call(routing,
                                                                            monkeypatch, gen):
    # a row loop's source holds the row length: one that changes every call makes a new
    # source every call, which must not be compiled each time (only sources met again are)
    monkeypatch.setitem(churn.ROUTE_NUMEL, "cpu", 64)
    compiled = []
    real = jit._compile_jobs
    monkeypatch.setattr(jit, "_compile_jobs",
                        lambda plan, jobs: (compiled.extend(j[-1] for j in jobs),
                                            real(plan, jobs)))
    for i in range(12):
        x0 = torch.randn(6, 40 + i, generator=gen, dtype=torch.float64)
        x, xr = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        go = torch.randn(6, 40 + i, generator=gen, dtype=torch.float64)
        assert_same(fastgrad.grad(torch.log_softmax(x, 1), x, go),
                    TORCH_GRAD(torch.log_softmax(xr, 1), xr, go), rtol=1e-12, atol=1e-12)
    assert len(routing) == 0
    assert len(compiled) <= 2, [src.count("\n") for src in compiled]
