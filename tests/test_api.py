"""The calling convention of fastgrad.grad: argument forms, flags, errors and
warnings must be those of torch.autograd.grad (compared live, never against
hard-coded text)."""

import math
import warnings

import pytest
import torch

import fastgrad
from conftest import FAST_GRAD, TORCH_GRAD, assert_same, assert_same_error, rand


def _both(setup, call):
    """Run ``call(grad_fn, *setup())`` once per engine on fresh graphs."""
    ref = call(TORCH_GRAD, *setup())
    got = call(FAST_GRAD, *setup())
    return got, ref


def _setup_xy(gen):
    x0, y0 = rand((3, 4), gen), rand((4,), gen)

    def setup():
        x = x0.clone().requires_grad_(True)
        y = y0.clone().requires_grad_(True)
        return x, y

    return setup


# ------------------------------------------------------------------ argument forms


def test_tensor_vs_sequences(gen):
    x0 = rand((3, 4), gen)
    for form in ("tensor", "tuple", "list"):
        def call(grad, x):
            out = (torch.sin(x) * x).sum()
            if form == "tensor":
                return grad(out, x)
            if form == "tuple":
                return grad((out,), (x,))
            return grad([out], [x])

        got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
        assert isinstance(got, tuple), f"{form}: result is {type(got)}"
        assert len(got) == 1
        assert_same(got, ref, what=form)


def test_grad_outputs_single_tensor_vs_list(gen):
    x0, v = rand((3, 4), gen), rand((3, 4), gen)
    setup = lambda: (x0.clone().requires_grad_(True),)  # noqa: E731
    for go in (v, [v], (v,)):
        got, ref = _both(setup, lambda grad, x: grad(torch.exp(x), x, grad_outputs=go))
        assert_same(got, ref)


@pytest.mark.parametrize("handed_to_torch", [False, True])
def test_generator_arguments(gen, handed_to_torch):
    """outputs, inputs and grad_outputs given as generators (``model.parameters()``), on
    fastgrad's path and on a call it hands to PyTorch after reading them (here: an input with
    a tensor hook), which must reach PyTorch with the same tensors."""
    x0, w0, v = rand((5, 3), gen), rand((3,), gen), rand((5, 3), gen)

    def setup():
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        if handed_to_torch:
            w.register_hook(lambda g: g * 3)
        return x, w

    def call(grad, x, w):
        outs = [torch.sin(x * w), torch.exp(x)]
        return grad((o for o in outs), (t for t in (x, w)), grad_outputs=(g for g in (v, v)))

    got, ref = _both(setup, call)
    assert_same(got, ref)
    if not handed_to_torch:
        x, w = setup()
        assert fastgrad.explain((o for o in [torch.sin(x * w)]), (t for t in (x, w)),
                                grad_outputs=(g for g in [v])).all_native


def test_dict_inputs(gen):
    x0, y0 = rand((3, 4), gen), rand((4,), gen)

    def setup():
        return x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)

    def call(grad, x, y):
        return grad((torch.tanh(x) * y).sum(), {"a": x, "b": y})

    try:
        ref = call(TORCH_GRAD, *setup())
    except (TypeError, RuntimeError) as e:
        # older releases (2.11 among them) reject a dict: fastgrad must raise the same error
        with pytest.raises(type(e)) as got_err:
            call(FAST_GRAD, *setup())
        assert str(got_err.value) == str(e)
        assert fastgrad.api._torch_takes_dicts() is False
        return
    assert fastgrad.api._torch_takes_dicts() is True
    got = call(FAST_GRAD, *setup())
    assert isinstance(got, dict), f"fastgrad returns {type(got)} for dict inputs"
    assert list(got.keys()) == list(ref.keys())
    for k in ref:
        assert_same((got[k],), (ref[k],), what=k)


def test_dict_inputs_go_whole_to_a_torch_that_rejects_them(monkeypatch, gen):
    # a release that rejects a dict of inputs is handed the dict unchanged, for its own error
    # (the installed one may take dicts: this stands in for an older one)
    seen = []

    def older_torch_grad(outputs, inputs, *rest):
        seen.append(type(inputs))
        raise RuntimeError("all inputs have to be Tensors or GradientEdges, but got str")

    monkeypatch.setattr(fastgrad.api, "_DICT_INPUTS", [False])
    monkeypatch.setattr(fastgrad.api, "_torch_grad", older_torch_grad)
    x = rand((3, 4), gen).requires_grad_(True)
    with pytest.raises(RuntimeError, match="but got str"):
        fastgrad.grad((torch.tanh(x) * x).sum(), {"x": x})
    assert seen == [dict]


def test_nonleaf_input(gen):
    x0 = rand((3, 4), gen)

    def call(grad, x):
        h = torch.sin(x) * 2.0
        y = (torch.exp(h) * h).sum()
        return grad(y, [h, x])

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert_same(got, ref)


def test_nonleaf_input_only_intermediate(gen):
    x0 = rand((3, 4), gen)

    def call(grad, x):
        h = x.t() * 3.0
        return grad((h ** 2).sum(), h)

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert_same(got, ref)


def test_several_outputs_and_inputs(gen):
    setup = _setup_xy(gen)
    v1, v2 = rand((3, 4), gen), rand((4,), gen)

    def call(grad, x, y):
        a = torch.sin(x) * y
        b = torch.exp(y) + x.sum(0)
        return grad([a, b], [x, y], grad_outputs=[v1, v2])

    got, ref = _both(setup, call)
    assert_same(got, ref)


def test_none_grad_outputs_scalar(gen):
    setup = _setup_xy(gen)

    def call(grad, x, y):
        return grad([(x * y).sum(), torch.cos(y).sum()], [x, y], grad_outputs=None)

    got, ref = _both(setup, call)
    assert_same(got, ref)


def test_mixed_none_in_grad_outputs(gen):
    setup = _setup_xy(gen)
    v = rand((3, 4), gen)

    def call(grad, x, y):
        s = (x * y).sum()       # scalar: None allowed
        t = torch.tanh(x) + y   # non-scalar: needs a cotangent
        return grad([s, t], [x, y], grad_outputs=[None, v])

    got, ref = _both(setup, call)
    assert_same(got, ref)


def test_allow_unused_none(gen):
    setup = _setup_xy(gen)

    def call(grad, x, y):
        return grad(torch.sin(x).sum(), [x, y], allow_unused=True)

    got, ref = _both(setup, call)
    assert ref[1] is None
    assert_same(got, ref)


@pytest.mark.parametrize("retain_graph", [None, False])
def test_create_graph_under_inference_mode(retain_graph, gen):
    """Nothing is recorded in inference mode: torch's results do not require grad, and
    create_graph keeps the graph unless retain_graph says otherwise."""
    x0 = rand((6,), gen)
    outcomes = []
    for grad in (TORCH_GRAD, fastgrad.grad):
        x = x0.clone().requires_grad_(True)
        y = (torch.tanh(x) ** 3).sum()
        with torch.inference_mode():
            got = [grad(y, x, create_graph=True, retain_graph=retain_graph)[0]
                   for _ in range(1 if retain_graph is False else 3)]
        assert all(not g.requires_grad and g.is_inference() for g in got)
        again = _outcome_of(lambda: grad(y, x))
        outcomes.append((got[-1], again))
    (a, a_again), (b, b_again) = outcomes
    assert_same((b,), (a,))
    if isinstance(a_again, Exception):
        assert (type(b_again), str(b_again)) == (type(a_again), str(a_again))
    else:
        assert_same(b_again, a_again)


def test_materialized_zeros_under_inference_mode(gen):
    """create_graph with materialize_grads in inference mode: PyTorch's zeros for an unused
    input still require grad."""
    x0, z0 = rand((4,), gen), rand((3,), gen)
    results = []
    for grad in (TORCH_GRAD, fastgrad.grad):
        x, z = x0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
        y = torch.sin(x).sum()
        with torch.inference_mode():
            r = grad(y, (x, z), allow_unused=True, materialize_grads=True, create_graph=True)
        results.append([(t.requires_grad, t.is_inference()) for t in r] + list(r))
    assert results[1][:2] == results[0][:2]
    assert_same(tuple(results[1][2:]), tuple(results[0][2:]))


@pytest.mark.parametrize("go_dtype", [torch.float32, torch.float64])
def test_create_graph_under_no_grad_with_a_grad_output_that_requires_grad(go_dtype, gen):
    """Under no_grad PyTorch casts a grad_output of another dtype before its engine records
    anything: the result then does not depend on it (with the output's dtype it does)."""
    x0, go0 = rand((5,), gen), rand((5,), gen, dtype=go_dtype)
    results = []
    for grad in (TORCH_GRAD, fastgrad.grad):
        x, go = x0.clone().requires_grad_(True), go0.clone().requires_grad_(True)
        y = x * x
        with torch.no_grad():
            gx, = grad(y, x, go, create_graph=True)
        results.append(TORCH_GRAD(gx.sum(), [x, go], allow_unused=True))
    assert (results[0][1] is None) == (go_dtype != torch.float64)  # (what the case checks)
    assert_same(results[1], results[0])


def _outcome_of(run):
    try:
        return run()
    except Exception as e:  # noqa: BLE001
        return e


@pytest.mark.parametrize("first_call", [True, False])
def test_calls_made_under_inference_mode(first_call, gen, monkeypatch):
    """A graph built outside inference mode and differentiated inside it, as torch allows: the
    leaf nodes' class read there (the process's first call with a leaf input) and an input the
    outputs do not reach (its edge made there) both need autograd recording back on."""
    from fastgrad import engine
    if first_call:
        monkeypatch.setattr(engine, "_ACCUMULATE_GRAD", [])
    x, z = rand((5,), gen).requires_grad_(True), rand((3,), gen).requires_grad_(True)
    y = (torch.sin(x) * x).sum()
    with torch.inference_mode():
        for _ in range(3):  # (the later calls hit the cache)
            got = fastgrad.grad(y, (x, z), allow_unused=True, retain_graph=True)
            ref = TORCH_GRAD(y, (x, z), allow_unused=True, retain_graph=True)
            assert_same(got, ref)


def test_a_freed_graph_differentiated_under_inference_mode(gen, monkeypatch):
    """A graph freed by the first call, differentiated again inside inference mode: PyTorch's
    error, whose text fastgrad reads from PyTorch on a throwaway graph the first time it needs
    it (here, inside inference mode, where nothing would be recorded)."""
    from fastgrad import node_view
    monkeypatch.setattr(node_view, "_FREED_MSG", [])

    def second_call(grad):
        x = rand((5,), gen).requires_grad_(True)
        y = (torch.sin(x) * x).sum()
        grad(y, x)
        with torch.inference_mode():
            grad(y, x)
    assert_same_error(lambda: second_call(TORCH_GRAD), lambda: second_call(FAST_GRAD))


def test_materialize_grads_zeros(gen):
    setup = _setup_xy(gen)

    def call(grad, x, y):
        return grad(torch.sin(x).sum(), [x, y], materialize_grads=True)

    got, ref = _both(setup, call)
    assert got[1] is not None
    assert_same(got, ref)


def test_materialize_grads_with_allow_unused_true(gen):
    setup = _setup_xy(gen)

    def call(grad, x, y):
        return grad(torch.sin(x).sum(), [y, x], allow_unused=True, materialize_grads=True)

    got, ref = _both(setup, call)
    assert_same(got, ref)


def test_is_grads_batched(gen):
    x0 = rand((3, 4), gen)
    gos = rand((5, 3, 4), gen)

    def call(grad, x):
        return grad(torch.sin(x) * torch.exp(x), x, grad_outputs=gos, is_grads_batched=True)

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert got[0].shape == (5, 3, 4)
    assert_same(got, ref)


def test_is_grads_batched_jacobian_rows(gen):
    x0 = rand((4,), gen)
    eye = torch.eye(4, dtype=torch.float64)

    def call(grad, x):
        return grad(torch.tanh(x) * x.sum(), x, grad_outputs=eye, is_grads_batched=True)

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert_same(got, ref)


def test_is_grads_batched_two_outputs(gen):
    setup = _setup_xy(gen)
    g1, g2 = rand((2, 3, 4), gen), rand((2, 4), gen)

    def call(grad, x, y):
        return grad([x * y, torch.exp(y)], [x, y], grad_outputs=[g1, g2], is_grads_batched=True)

    got, ref = _both(setup, call)
    assert_same(got, ref)


def _count_engine_runs(monkeypatch):
    from fastgrad import engine
    runs = []
    real = engine.run

    def run(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "run", run)
    return runs


@pytest.mark.parametrize("n, native", [(100, False), (9000, True)])
def test_batched_calls_over_small_rows_go_to_pytorch(n, native, gen, monkeypatch):
    """fastgrad runs a batched call's plan once per row (about 30 us a row), PyTorch one
    backward under vmap: rows under api.BATCHED_ROW_NUMEL go to PyTorch whole (64 rows of
    1000 took 4x PyTorch's time). Both ways give PyTorch's results; the engine runs only the
    large rows."""
    monkeypatch.setattr(fastgrad.api, "BATCHED_ROW_NUMEL", {"cpu": 8192})
    x0, gos = rand((n,), gen), rand((6, n), gen)
    runs = _count_engine_runs(monkeypatch)

    def call(grad, x):
        y = torch.softmax(torch.sin(x) * torch.exp(x), 0) + torch.tanh(x)
        return grad(y, x, grad_outputs=gos, is_grads_batched=True)

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert_same(got, ref)
    assert bool(runs) == native


def test_batched_create_graph_under_no_grad_keeps_the_graph(gen):
    """PyTorch's engine records with create_graph whatever the caller's grad mode: the stacked
    rows must carry their graph under no_grad too (a second derivative through them)."""
    x0, gos = rand((3,), gen), rand((2, 3), gen)

    def call(grad, x):
        y = torch.sin(x) * torch.exp(x)
        with torch.no_grad():
            r, = grad(y, x, gos, create_graph=True, is_grads_batched=True)
        assert r.requires_grad
        return (r,) + grad((r * r).sum(), x)

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert_same(got, ref)


@pytest.mark.parametrize("flag", ["allow_unused", "materialize_grads"])
@pytest.mark.parametrize("value", ["yes", 1.5, [], -1, None])
def test_bool_flags_of_other_types_raise_as_pytorch(flag, value, gen):
    """PyTorch reads allow_unused and materialize_grads as C booleans: a string, a float, a
    list or a negative int raise its TypeError or OverflowError, even when every input is used
    (None is allow_unused's default)."""
    if flag == "allow_unused" and value is None:
        pytest.skip("None is allow_unused's default")
    x0 = rand((3,), gen)

    def call(grad):
        x = x0.clone().requires_grad_(True)
        return grad((x * x).sum(), x, **{flag: value})
    assert_same_error(lambda: call(TORCH_GRAD), lambda: call(FAST_GRAD))


_BATCHED_REFUSED = {
    # name: (outputs of x, grad_outputs) that PyTorch's vmap refuses
    "batch sizes differ": (lambda x: [x.sum(1), (x * x).sum(0)], lambda g: [g(2, 3), g(3, 4)]),
    "batch sizes differ, larger first": (lambda x: [x.sum(1), (x * x).sum(0)],
                                         lambda g: [g(3, 3), g(2, 4)]),
    "no batch dim (scalar, implicit ones)": (lambda x: (x * 2).sum(), lambda g: None),
}


@pytest.mark.parametrize("name", sorted(_BATCHED_REFUSED))
def test_is_grads_batched_refused_as_pytorch_refuses(name, gen):
    outs, gos = _BATCHED_REFUSED[name]
    x0 = rand((3, 4), gen)
    go = gos(lambda *shape: rand(shape, gen))

    def call(grad):
        x = x0.clone().requires_grad_(True)
        return grad(outs(x), x, go, retain_graph=True, is_grads_batched=True)
    assert_same_error(lambda: call(TORCH_GRAD), lambda: call(FAST_GRAD))


@pytest.mark.parametrize("op", ["max", "min", "median", "amax"])
def test_is_grads_batched_through_a_derivative_vmap_changes(op, gen):
    """Under vmap PyTorch's evenly_distribute_backward (max(), min(), median() of every
    element) multiplies the gradient by its mask: inf or NaN rows give NaN off the mask where
    a row alone gives 0. Such calls go to PyTorch whole (amax: the same either way, native)."""
    x0 = rand((3, 4), gen)
    go = torch.cat([rand((3,), gen), torch.tensor([math.inf, -math.inf, math.nan],
                                                  dtype=torch.float64)])

    def call(grad):
        x = x0.clone().requires_grad_(True)
        return grad(getattr(x, op)(), x, go, is_grads_batched=True)
    assert_same(call(FAST_GRAD), call(TORCH_GRAD))


def test_a_batched_call_with_an_unused_input_frees_the_graph_as_torch(gen):
    """PyTorch raises for an input no path reaches after its engine ran the graph, and frees
    it: the next call raises the freed-graph error, on the batched path as on the plain one."""
    x0, u0, go = rand((3,), gen), rand((3,), gen), rand((2, 3), gen)

    def calls(grad):
        x, u = x0.clone().requires_grad_(True), u0.clone().requires_grad_(True)
        y, v = x.tan(), u * 2
        errors = []
        for _ in range(2):
            with pytest.raises(RuntimeError) as e:
                grad([y], [v, x], [go], is_grads_batched=True)
            errors.append(str(e.value))
        return errors
    assert calls(FAST_GRAD) == calls(TORCH_GRAD)


def test_materialize_grads_with_a_gradient_edge_refused_as_pytorch_refuses(gen):
    from torch.autograd.graph import get_gradient_edge
    x0 = rand((3, 4), gen)

    def call(grad):
        x = x0.clone().requires_grad_(True)
        other = rand((2,), gen).requires_grad_(True) * 2.0
        return grad((x * 2).sum(), [x, get_gradient_edge(other)], materialize_grads=True)
    assert_same_error(lambda: call(TORCH_GRAD), lambda: call(FAST_GRAD))


# ------------------------------------------------------------------ retain_graph


def test_retain_graph_default_frees(gen):
    x0 = rand((3, 4), gen)

    def make():
        x = x0.clone().requires_grad_(True)
        return x, (torch.sin(x) * x).sum()

    def twice(grad):
        x, y = make()
        grad(y, x)
        grad(y, x)

    assert_same_error(lambda: twice(TORCH_GRAD), lambda: twice(FAST_GRAD))


def test_fastgrad_frees_graph_for_torch_too(gen):
    """After fastgrad.grad (retain_graph unset) the graph is freed: torch's next call fails alike."""
    x0 = rand((3, 4), gen)

    def then_torch(first):
        x = x0.clone().requires_grad_(True)
        y = (torch.exp(x) * x).sum()
        first(y, x)
        TORCH_GRAD(y, x)

    assert_same_error(lambda: then_torch(TORCH_GRAD), lambda: then_torch(FAST_GRAD))


def test_fastgrad_frees_inner_nodes_for_torch_too(gen):
    """Every node the call ran is freed, not only the output's: torch then fails on a backward
    that starts at an intermediate tensor (sin's node holds a saved tensor), and succeeds where
    only nodes without saved tensors were run (x + 1)."""
    x0 = rand((3, 4), gen)

    def then_torch(first, start):
        x = x0.clone().requires_grad_(True)
        s, a = torch.sin(x), x + 1.0
        y = (torch.exp(s) + a).sum()
        first(y, x)
        return TORCH_GRAD({"sin": s, "add": a}[start].sum(), x)

    assert_same_error(lambda: then_torch(TORCH_GRAD, "sin"), lambda: then_torch(FAST_GRAD, "sin"))
    assert_same(then_torch(FAST_GRAD, "add"), then_torch(TORCH_GRAD, "add"))


def test_retain_graph_true_allows_second_call(gen):
    x0 = rand((3, 4), gen)
    x = x0.clone().requires_grad_(True)
    y = (torch.sin(x) * x).sum()
    g1 = FAST_GRAD(y, x, retain_graph=True)
    g2 = FAST_GRAD(y, x, retain_graph=True)
    g3 = TORCH_GRAD(y, x)  # still alive: fastgrad retained it
    assert_same(g1, g3)
    assert_same(g2, g3)


def test_create_graph_retains_by_default(gen):
    x0 = rand((3, 4), gen)
    x = x0.clone().requires_grad_(True)
    y = (torch.sin(x) ** 2).sum()
    g1 = FAST_GRAD(y, x, create_graph=True)
    g2 = FAST_GRAD(y, x)  # retain_graph defaulted to create_graph=True
    xr = x0.clone().requires_grad_(True)
    ref = TORCH_GRAD((torch.sin(xr) ** 2).sum(), xr)
    assert_same(g1, ref)
    assert_same(g2, ref)


def test_explain_does_not_free_graph(gen):
    x0 = rand((3, 4), gen)
    x = x0.clone().requires_grad_(True)
    y = (torch.sin(x) * torch.exp(x)).sum()
    report = fastgrad.explain(y, x)
    assert isinstance(str(report), str) and len(str(report).splitlines()) >= 2
    got = FAST_GRAD(y, x)
    xr = x0.clone().requires_grad_(True)
    assert_same(got, TORCH_GRAD((torch.sin(xr) * torch.exp(xr)).sum(), xr))


def test_explain_report_fields(gen):
    x = rand((3, 4), gen).requires_grad_(True)
    y = (torch.sin(x) * torch.exp(x)).sum()
    r = fastgrad.explain(y, x)
    assert isinstance(r.native, list) and all(isinstance(n, str) for n in r.native)
    assert "SinBackward0" in r.native and "ExpBackward0" in r.native, str(r)
    assert isinstance(r.fallback, list)
    assert r.all_native is True
    assert isinstance(r.regions, list) and len(r.regions) >= 1
    assert isinstance(r.kernel_launches, int) and r.kernel_launches >= 1
    assert isinstance(r.bytes_read, int) and r.bytes_read > 0
    assert isinstance(r.bytes_written, int) and r.bytes_written >= x.numel() * x.element_size()


# ------------------------------------------------------------------ errors


def _err_case(gen, build):
    """build(grad) performs one call on a fresh graph; compare torch vs fastgrad errors."""
    assert_same_error(lambda: build(TORCH_GRAD), lambda: build(FAST_GRAD))


def test_error_nonscalar_without_grad_outputs(gen):
    x0 = rand((3, 4), gen)

    def build(grad):
        x = x0.clone().requires_grad_(True)
        return grad(torch.sin(x), x)

    _err_case(gen, build)


def test_error_unused_input(gen):
    setup = _setup_xy(gen)

    def build(grad):
        x, y = setup()
        return grad(torch.sin(x).sum(), [x, y])

    _err_case(gen, build)


def test_error_unused_input_allow_unused_false(gen):
    setup = _setup_xy(gen)

    def build(grad):
        x, y = setup()
        return grad(torch.sin(x).sum(), [y, x], allow_unused=False)

    _err_case(gen, build)


def test_error_grad_outputs_shape_mismatch(gen):
    x0, v = rand((3, 4), gen), rand((4,), gen)

    def build(grad):
        x = x0.clone().requires_grad_(True)
        return grad(torch.exp(x), x, grad_outputs=v)

    _err_case(gen, build)


def test_grad_outputs_length_mismatch_same_behaviour(gen):
    """More grad_outputs than outputs: whatever torch does (raise or ignore), fastgrad does."""
    x0, v = rand((3, 4), gen), rand((3, 4), gen)

    def build(grad):
        x = x0.clone().requires_grad_(True)
        return grad([torch.exp(x)], x, grad_outputs=[v, v * 2])

    try:
        ref = build(TORCH_GRAD)
    except Exception:  # noqa: BLE001
        assert_same_error(lambda: build(TORCH_GRAD), lambda: build(FAST_GRAD))
    else:
        assert_same(build(FAST_GRAD), ref)


@pytest.mark.parametrize("scalar", [False, True])
def test_error_fewer_grad_outputs_than_outputs(gen, scalar):
    """PyTorch's engine raises "got 2 tensors and 1 gradients"; fastgrad once dropped the
    output without a gradient, on a fresh graph and on one seen before."""
    x0, v = rand((3, 4), gen), rand(() if scalar else (3, 4), gen)
    x = x0.clone().requires_grad_(True)
    y = torch.exp(x)
    outs = [y.sum(), torch.sin(x).sum()] if scalar else [y, y * 2]
    for _ in range(2):  # (the second call meets a graph seen before)
        assert_same_error(lambda: TORCH_GRAD(outs, x, grad_outputs=[v], retain_graph=True),
                          lambda: FAST_GRAD(outs, x, grad_outputs=[v], retain_graph=True))
        FAST_GRAD(outs, x, grad_outputs=[v, v], retain_graph=True)


def test_error_input_does_not_require_grad(gen):
    setup = _setup_xy(gen)
    z = rand((2,), gen)

    def build(grad):
        x, _ = setup()
        return grad((torch.sin(x) * 2).sum(), [x, z])

    _err_case(gen, build)


def test_error_output_without_grad_fn(gen):
    setup = _setup_xy(gen)
    z = rand((3,), gen)

    def build(grad):
        x, _ = setup()
        return grad(torch.sin(z).sum(), x)

    _err_case(gen, build)


@pytest.mark.parametrize("flags", [dict(create_graph=None), dict(create_graph="yes"),
                                   dict(create_graph=1.0), dict(retain_graph="x"),
                                   dict(create_graph=1), dict(create_graph=True, retain_graph=0)])
def test_flags_that_are_not_bools_as_torch_reads_them(flags, gen):
    """torch reads create_graph and retain_graph as C integers: 0 and 1 pass, None, strings
    and floats raise its TypeError."""
    x0 = rand((5,), gen)
    outcomes = []
    for grad in (TORCH_GRAD, fastgrad.grad):
        x = x0.clone().requires_grad_(True)
        try:
            r = grad((torch.sin(x) * x).sum(), x, **flags)
            outcomes.append((r[0].detach(), r[0].requires_grad))
        except Exception as e:  # noqa: BLE001
            outcomes.append((type(e), str(e)))
    (a, fa), (b, fb) = outcomes
    if isinstance(a, torch.Tensor):
        assert_same((b,), (a,))
        assert fa == fb
    else:
        assert (a, fa) == (b, fb)


def test_error_empty_inputs(gen):
    setup = _setup_xy(gen)

    def build(grad):
        x, _ = setup()
        return grad(torch.sin(x).sum(), [])

    _err_case(gen, build)


def test_error_graph_freed(gen):
    x0 = rand((3, 4), gen)

    def build(grad):
        x = x0.clone().requires_grad_(True)
        y = (torch.exp(x) * torch.sin(x)).sum()
        grad(y, x)
        return grad(y, x)

    _err_case(gen, build)


def test_error_graph_freed_by_backward(gen):
    x0 = rand((3, 4), gen)

    def build(grad):
        x = x0.clone().requires_grad_(True)
        y = (torch.exp(x) * torch.sin(x)).sum()
        y.backward()
        return grad(y, x)

    _err_case(gen, build)


def test_error_materialize_without_allow_unused(gen):
    setup = _setup_xy(gen)

    def build(grad):
        x, y = setup()
        return grad(torch.sin(x).sum(), [x, y], allow_unused=False, materialize_grads=True)

    _err_case(gen, build)


def test_error_inplace_modified_saved_tensor(gen):
    x0 = rand((3, 4), gen)

    def build(grad):
        x = x0.clone().requires_grad_(True)
        h = x * 2
        y = torch.sin(h)
        h.add_(1.0)  # sin saved h: version counter bumped
        return grad(y.sum(), x)

    _err_case(gen, build)


def _freed_on_the_way(grad, x):
    # the first call frees exp; the second fails at it after PyTorch's engine ran (and freed)
    # the product: a third call through the product alone fails too
    h = x.exp()
    y1, y2 = h.sum(), (h * 2).sum()
    grad(y1, x)
    return [lambda: grad(y2, x), lambda: grad(y2, h)]


def _modified_on_the_way(grad, x):
    e = x.exp()
    h = e.sin()
    y = (h * 3).sum()
    with torch.no_grad():
        e.add_(1.0)
    return [lambda: grad(y, x), lambda: grad(y, h)]


def _modified_under_a_node_handed_back(grad, x):
    # y saved by exp (native) and read by gather (PyTorch's node): PyTorch names the node it
    # meets first, gather's input as it is now (CopySlices)
    y = x.exp()
    z = y.gather(1, torch.zeros(x.shape[0], 1, dtype=torch.long))
    y[:].mul_(2)
    return [lambda: grad(z, x, torch.ones_like(z))]


def _two_errors_in_one_graph(grad, x):
    # PyTorch's engine meets the write through overlapping memory before the version error
    y = x[0].clone()
    c = y.cos()
    y.clamp_(-0.3, 0.3)
    v = c.expand(2, y.shape[0])
    v[torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) > 0.4] = 2.0
    return [lambda: grad(v, x, torch.ones_like(v))]


@pytest.mark.filterwarnings("ignore:Use of (index_put_|masked_fill_) on expanded tensors:UserWarning")
@pytest.mark.parametrize("case", [_freed_on_the_way, _modified_on_the_way,
                                  _modified_under_a_node_handed_back, _two_errors_in_one_graph])
def test_a_call_that_fails_part_way(case, gen):
    """PyTorch's engine fails at the first node in its order that cannot run (freed, or a
    saved tensor modified in place), after running, and freeing, the nodes before it: the
    error names that node, and a later call through those nodes fails too."""
    x0 = rand((3, 4), gen)
    outcomes = []
    for grad in (TORCH_GRAD, fastgrad.grad):
        calls = case(grad, x0.clone().requires_grad_(True))
        outcomes.append([_outcome_of(c) for c in calls])
    for ref, got in zip(*outcomes):
        if isinstance(ref, Exception) or isinstance(got, Exception):
            assert (type(got), str(got)) == (type(ref), str(ref))
        else:
            assert_same(got, ref)
    assert isinstance(outcomes[0][0], RuntimeError)  # (each case fails where it says)


@pytest.mark.parametrize("create_graph", [False, True])
def test_error_nan_under_anomaly_detection(create_graph, gen):
    """Under torch.autograd.set_detect_anomaly PyTorch checks each node's results and names
    the node that made a NaN; fastgrad hands such calls to it (sqrt's derivative at -1 is NaN;
    a fused plan returned it silently)."""
    x0 = rand((3, 4), gen)
    x0[0, 0] = -1.0

    def build(grad):
        x = x0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (anomaly mode's own warnings)
            with torch.autograd.set_detect_anomaly(True):
                y = (torch.sqrt(x) * torch.exp(x)).sum()
                return grad(y, x, create_graph=create_graph)

    _err_case(gen, build)


def test_explain_under_anomaly_detection(gen):
    x = rand((3,), gen).requires_grad_(True)
    with torch.autograd.set_detect_anomaly(True):
        rep = fastgrad.explain(torch.exp(x).sum(), x)
    assert rep.fallback == [("<whole call>", fastgrad.api.ANOMALY_REASON)], rep


@pytest.mark.parametrize("create_graph", [False, True])
def test_calls_under_autocast(create_graph, gen):
    """A grad call made inside torch.autocast: PyTorch runs the products in bfloat16 and casts
    each gradient back to float32; fastgrad returned bfloat16 gradients. Such calls go to
    PyTorch (results, dtypes and the second derivative as its own)."""
    x0 = rand((5, 4), gen, dtype=torch.float32)
    w1, w2 = rand((4, 8), gen, dtype=torch.float32), rand((8, 3), gen, dtype=torch.float32)

    def run(grad):
        x = x0.clone().requires_grad_(True)
        y = ((x @ w1).tanh() @ w2).tanh().sum()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = grad(y, x, create_graph=create_graph, retain_graph=True)
            if create_graph:
                res = res + grad((res[0] * x).sum(), x, retain_graph=True)
        return res, y, x
    (want, _, _), (got, y, x) = run(TORCH_GRAD), run(FAST_GRAD)
    assert [g.dtype for g in got] == [g.dtype for g in want] == [torch.float32] * len(want)
    assert_same(got, want, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rep = fastgrad.explain(y, x)
    assert rep.fallback == [("<whole call>", fastgrad.api.AUTOCAST_REASON)], rep


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch's forward AD scripts a helper)
@pytest.mark.parametrize("create_graph", [False, True])
def test_calls_inside_a_forward_ad_level(create_graph, gen):
    """Forward over reverse: inside torch.autograd.forward_ad.dual_level PyTorch's gradients
    of a graph built from dual tensors carry tangents; fastgrad's had none (and create_graph
    raised: its region Function has no jvp). Such calls go to PyTorch."""
    import torch.autograd.forward_ad as fwAD
    x0, t0 = rand((4,), gen), rand((4,), gen)

    def run(grad):
        x = x0.clone().requires_grad_(True)
        with fwAD.dual_level():
            y = (torch.sin(fwAD.make_dual(x, t0)) * 2).sum()
            (g,) = grad(y, x, create_graph=create_graph)
            return g, fwAD.unpack_dual(g).tangent
    (want, want_t), (got, got_t) = run(TORCH_GRAD), run(FAST_GRAD)
    assert want_t is not None and got_t is not None
    assert_same([got, got_t], [want, want_t])


def test_calls_inside_vmap(gen):
    """Rows of a Jacobian by vmap over grad_outputs (functorch's batched tensors have no
    storage: fastgrad raised "Cannot access data pointer"): such calls go to PyTorch."""
    x0 = rand((3,), gen)

    def run(grad):
        x = x0.clone().requires_grad_(True)
        y = torch.sin(x) * torch.exp(x)
        return torch.func.vmap(lambda v: grad(y, x, v, retain_graph=True)[0])(
            torch.eye(3, dtype=x.dtype))
    assert_same(run(FAST_GRAD), run(TORCH_GRAD))


# ------------------------------------------------------------------ warnings & side effects


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fn()
    return res, [(x.category, str(x.message)) for x in w]


def test_only_inputs_false_warning(gen):
    x0 = rand((3, 4), gen)

    def call(grad):
        x = x0.clone().requires_grad_(True)
        return grad((torch.sin(x) * x).sum(), x, only_inputs=False)

    ref, ref_w = _warnings_of(lambda: call(TORCH_GRAD))
    got, got_w = _warnings_of(lambda: call(FAST_GRAD))
    assert ref_w, "torch no longer warns for only_inputs=False"
    assert [c for c, _ in got_w] == [c for c, _ in ref_w], f"fastgrad: {got_w}\ntorch: {ref_w}"
    assert [m for _, m in got_w] == [m for _, m in ref_w]
    assert_same(got, ref)


def test_no_warning_by_default(gen):
    x0 = rand((3, 4), gen)
    x = x0.clone().requires_grad_(True)
    _, w = _warnings_of(lambda: FAST_GRAD((torch.sin(x) * x).sum(), x))
    assert not w, w


def test_leaf_grad_untouched(gen):
    setup = _setup_xy(gen)
    x, y = setup()
    h = torch.tanh(x) * y
    FAST_GRAD(h.sum(), [x, y])
    assert x.grad is None and y.grad is None
    x2, y2 = setup()
    h2 = torch.sin(x2) * y2
    g = FAST_GRAD(h2.sum(), x2, create_graph=True)[0]
    FAST_GRAD((g * g).sum(), [x2, y2])
    assert x2.grad is None and y2.grad is None


def test_leaf_grad_existing_value_kept(gen):
    setup = _setup_xy(gen)
    x, y = setup()
    x.grad = rand((3, 4), gen)
    before = x.grad.clone()
    FAST_GRAD((torch.exp(x) * y).sum(), [x, y])
    torch.testing.assert_close(x.grad, before)
    assert y.grad is None


def test_results_do_not_share_buffers(gen):
    # mutating a returned gradient must not change a later result (no cached buffers leaking)
    x0, v = rand((3, 4), gen), rand((3, 4), gen)
    x = x0.clone().requires_grad_(True)
    g1 = FAST_GRAD(torch.sin(x), x, grad_outputs=v)[0]
    g1_copy = g1.clone()
    x2 = x0.clone().requires_grad_(True)
    g2 = FAST_GRAD(torch.sin(x2), x2, grad_outputs=v)[0]
    g2.mul_(0.0)
    torch.testing.assert_close(g1, g1_copy)


def test_result_requires_grad_flags(gen):
    setup = _setup_xy(gen)
    for create in (False, True):
        def call(grad, x, y):
            return grad((torch.sin(x) * y).sum(), [x, y], create_graph=create)

        got, ref = _both(setup, call)
        assert [g.requires_grad for g in got] == [g.requires_grad for g in ref], create
        assert_same(got, ref)


def test_grad_mode_disabled_context(gen):
    """torch.autograd.grad works under no_grad (the graph was built before); so must fastgrad."""
    x0 = rand((3, 4), gen)

    def call(grad, x):
        y = (torch.sin(x) * x).sum()
        with torch.no_grad():
            return grad(y, x)

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert_same(got, ref)


def test_float32(gen):
    x0 = rand((3, 4), gen, dtype=torch.float32)

    def call(grad, x):
        return grad((torch.tanh(x) * torch.exp(x)).sum(), x)

    got, ref = _both(lambda: (x0.clone().requires_grad_(True),), call)
    assert got[0].dtype == torch.float32
    assert_same(got, ref)


def test_torch_grad_can_be_patched(gen):
    """Libraries call torch.autograd.grad by name; patching it to fastgrad.grad must not recurse."""
    x0 = rand((3, 4), gen)
    xr = x0.clone().requires_grad_(True)
    ref = TORCH_GRAD((torch.sin(xr) ** 3).sum(), xr, create_graph=True)
    orig = torch.autograd.grad
    try:
        torch.autograd.grad = fastgrad.grad
        x = x0.clone().requires_grad_(True)
        got = torch.autograd.grad((torch.sin(x) ** 3).sum(), x, create_graph=True)
        got2 = torch.autograd.grad(got[0].sum(), x)
    finally:
        torch.autograd.grad = orig
    assert_same(got, ref)
    assert_same(got2, TORCH_GRAD(ref[0].sum(), xr))


@pytest.mark.parametrize("fn", [lambda x: x.sum(), lambda x: x.sum(1).sum(),
                                lambda x: x.sum(0, keepdim=True).sum(), lambda x: x.mean()],
                         ids=["sum", "sum_sum", "sum_keepdim_sum", "mean"])
def test_broadcast_results_are_views_like_torch(fn, gen):
    """The VJP of a sum is an expanded view of the grad_output in torch; fastgrad returns the
    same layout (and writes nothing), and materialises what torch materialises."""
    x = rand((4, 3), gen).requires_grad_(True)
    y = fn(x)
    go = rand(y.shape, gen)
    ref = TORCH_GRAD(y, x, go, retain_graph=True)
    got = fastgrad.grad(y, x, go, retain_graph=True)
    assert_same(got, ref)
    assert got[0].stride() == ref[0].stride()
    if 0 in ref[0].stride():
        assert fastgrad.explain(y, x, go).kernel_launches == 0


def test_inplace_change_after_forward_gives_torchs_error(gen):
    """A saved tensor changed in place: PyTorch refuses; so does fastgrad (same error)."""
    def run(grad):
        x = rand((4,), gen).requires_grad_(True)
        a = x * 1.0
        y = (torch.sin(a) * torch.exp(a)).sum()
        with torch.no_grad():
            a.add_(1.0)
        return grad(y, x)
    assert_same_error(lambda: run(TORCH_GRAD), lambda: run(FAST_GRAD))


def test_saved_value_changed_in_place_under_no_grad(gen):
    """PyTorch allows changing y = sin(x) in place after sin saved x (mul saved y afterwards):
    the gradient must use y's current value, not sin(x)."""
    def run(grad, x0):
        x = x0.clone().requires_grad_(True)
        y = x.sin()
        with torch.no_grad():
            y.add_(1.0)
        return grad((y * y).sum(), x)
    x0 = rand((5,), gen)
    assert_same(run(FAST_GRAD, x0), run(TORCH_GRAD, x0))


def test_derivative_through_an_intermediate_input(gen):
    """Second order with respect to an intermediate tensor y = sin(x) of the first graph."""
    def run(grad, x0):
        x = x0.clone().requires_grad_(True)
        y = x.sin()
        (gx,) = grad((y * y * x).sum(), x, create_graph=True)
        return (gx,) + TORCH_GRAD(gx.sum(), y, allow_unused=True)
    x0 = rand((5,), gen)
    assert_same(run(FAST_GRAD, x0), run(TORCH_GRAD, x0))
