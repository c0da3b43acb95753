"""Tensor hooks (Tensor.register_hook) in graphs fastgrad differentiates: PyTorch runs them on
the gradient of the hooked tensor and uses what they return; fastgrad must too."""
import pytest
import torch

import fastgrad
from fastgrad import engine, graph_cache, hooks, sweep

from conftest import FAST_GRAD, TORCH_GRAD, Twice, assert_same, assert_same_error, rand


def _run(grad, x0, hooks, create_graph=False, remove=False):
    x = x0.clone().requires_grad_(True)
    h = torch.sin(x)
    handles = [h.register_hook(hk) for hk in hooks]
    if remove:
        handles[0].remove()
    y = (torch.exp(h) * 2).sum()
    g = grad(y, x, create_graph=create_graph)
    if create_graph:
        return g + grad(g[0].sum(), x)
    return g


HOOKS = {
    "scale": [lambda g: g * 3.0],
    "observe_only": [lambda g: None],
    "two_in_order": [lambda g: g + 1.0, lambda g: g * 2.0],
    "clamp": [lambda g: g.clamp(-0.5, 0.5)],
}


@pytest.mark.parametrize("name", list(HOOKS))
@pytest.mark.parametrize("create_graph", [False, True])
def test_tensor_hooks_on_intermediates(name, create_graph, gen):
    x0 = rand((3, 4), gen)
    for _ in range(2):  # the second call would be a cache hit without hooks
        assert_same(_run(FAST_GRAD, x0, HOOKS[name], create_graph),
                    _run(TORCH_GRAD, x0, HOOKS[name], create_graph))


def test_removed_hook_is_not_run(gen):
    x0 = rand((5,), gen)
    hooks = [lambda g: g * 100.0, lambda g: g + 1.0]
    assert_same(_run(FAST_GRAD, x0, hooks, remove=True), _run(TORCH_GRAD, x0, hooks, remove=True))


def test_hook_sees_the_accumulated_gradient(gen):
    seen = {}

    def run(grad, tag):
        x = rand((4,), gen).requires_grad_(True) if tag == "t" else xs["t"].detach().clone()
        if tag == "f":
            x.requires_grad_(True)
        xs[tag] = x
        h = x * 2.0
        h.register_hook(lambda g: seen.__setitem__(tag, g.clone()))
        y = (torch.sin(h) + torch.cos(h) * h).sum()  # two paths into h
        return grad(y, x)

    xs = {}
    ref = run(TORCH_GRAD, "t")
    got = run(FAST_GRAD, "f")
    assert_same(got, ref)
    torch.testing.assert_close(seen["f"], seen["t"])


@pytest.mark.parametrize("leaf", [True, False])
def test_hooks_on_inputs(leaf, gen):
    x0 = rand((3,), gen)

    def run(grad):
        x = x0.clone().requires_grad_(True)
        inp = x if leaf else x * 1.0
        inp.register_hook(lambda g: g * 10.0)
        return grad((torch.tanh(inp) ** 2).sum(), inp)
    assert_same(run(FAST_GRAD), run(TORCH_GRAD))


def test_hooked_graphs_are_not_cached(gen):
    graph_cache.clear()
    _run(FAST_GRAD, rand((3,), gen), [lambda g: g * 2.0])
    assert len(graph_cache._ENTRIES) == 0


def test_hook_on_a_gradient_edge_input(gen):
    x0 = rand((3,), gen)

    def run(grad):
        x = x0.clone().requires_grad_(True)
        y = x.sin()
        y.register_hook(lambda g: g * 2.0)
        return grad((y * y).sum(), torch.autograd.graph.get_gradient_edge(y))
    assert_same(run(FAST_GRAD), run(TORCH_GRAD))


def _retaining(x, go):
    """(output, tensors that retain their gradient) of a chain through two retaining tensors."""
    h = torch.sin(x)
    h.retain_grad()
    k = torch.exp(h) * h
    k.retain_grad()
    return (k * go).sum(), [h, k]


# name -> how the retaining graph is differentiated: G, x, go -> list of what to compare
RETAIN_CASES = {
    # two calls on one graph: .grad accumulates
    "twice_accumulates": lambda G, x, go: (lambda y, ts: (G(y, x, retain_graph=True),
                                                         G(y, x), [t.grad for t in ts])[2])(
        *_retaining(x, go)),
    # the retaining tensor is the input asked for
    "wrt_the_retaining_tensor": lambda G, x, go: (lambda y, ts: (G(y, ts[0]),
                                                                [t.grad for t in ts])[1])(
        *_retaining(x, go)),
    # with a tensor hook as well: the retained gradient is the hooked one
    "after_a_hook": lambda G, x, go: (lambda y, ts: (ts[0].register_hook(lambda g: g * 3), G(y, x),
                                                     [t.grad for t in ts])[2])(
        *_retaining(x, go)),
    # create_graph: the retained gradient carries a graph, as PyTorch's copy does
    "create_graph": lambda G, x, go: (lambda y, ts: (G(y, x, create_graph=True),
                                                     [t.grad for t in ts],
                                                     [t.grad.requires_grad for t in ts])[1:])(
        *_retaining(x, go)),
}


@pytest.mark.parametrize("name", list(RETAIN_CASES))
def test_retain_grad_like_torch(name, gen):
    """torch.autograd.grad fills .grad of the tensors on its path that retain their gradient
    (Tensor.retain_grad); fastgrad.grad must too. Twice: the second on a graph of the same
    structure."""
    x0, go = rand((3, 4), gen), rand((3, 4), gen)
    for _ in range(2):
        got = [RETAIN_CASES[name](G, x0.clone().requires_grad_(True), go)
               for G in (TORCH_GRAD, FAST_GRAD)]
        ref, out = got
        if name == "create_graph":
            assert out[1] == ref[1]
            ref, out = ref[0], out[0]
        assert all(r is not None for r in ref)
        assert_same(out, ref)


# ---- hooks on nodes (grad_fn.register_prehook / register_hook), which fastgrad cannot list ----

def _module_with_full_hooks(x, calls):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 8), torch.nn.Tanh(),
                            torch.nn.Linear(8, 1)).to(x.dtype)
    m[1].register_full_backward_hook(lambda mod, gi, go: (calls.append("post"), (gi[0] * 2,))[1])
    m[1].register_full_backward_pre_hook(lambda mod, go: (calls.append("pre"), (go[0] * 3,))[1])
    return m(x).sum()


def _scale_pre(calls, factor):
    return lambda go: (calls.append("pre"), (go[0] * factor,))[1]


# name -> (x, calls) -> a scalar output; the hooks note their calls in `calls`
NODE_HOOK_CASES = {
    # a pre-hook replacing the gradient into a node fastgrad lowers
    "prehook_on_lowered_node": lambda x, calls: (lambda e: (
        e.grad_fn.register_prehook(_scale_pre(calls, 2.0)), (e * torch.sin(x)).sum())[1])(
        torch.exp(x)),
    # a hook replacing what a lowered node returns
    "hook_on_lowered_node": lambda x, calls: (lambda m: (
        m.grad_fn.register_hook(lambda gi, go: (calls.append("post"), (gi[0] + 1.0, gi[1]))[1]),
        torch.tanh(m).sum())[1])(torch.sin(x) * torch.cos(x)),
    # one that only looks
    "observing_prehook": lambda x, calls: (lambda e: (
        e.grad_fn.register_prehook(lambda go: calls.append("pre")), (e ** 2).sum())[1])(
        torch.exp(x)),
    # removed before the call: nothing left to run
    "removed_prehook": lambda x, calls: (lambda e: (
        e.grad_fn.register_prehook(_scale_pre(calls, 5.0)).remove(), (e ** 2).sum())[1])(
        torch.exp(x)),
    # a Python Function's node, which fastgrad runs through PyTorch's engine (hooks and all)
    "hook_on_python_function": lambda x, calls: (lambda t: (
        t.grad_fn.register_prehook(_scale_pre(calls, 3.0)), torch.sin(t).sum())[1])(
        Twice.apply(x)),
    # module full backward hooks: node hooks on BackwardHookFunctionBackward (Python Functions)
    "module_full_backward_hooks": _module_with_full_hooks,
}
# where fastgrad stays native (the hooked nodes run through PyTorch's engine, or none is left)
NODE_HOOKS_NATIVE = {"removed_prehook", "hook_on_python_function", "module_full_backward_hooks"}


@pytest.mark.parametrize("name", list(NODE_HOOK_CASES))
@pytest.mark.parametrize("create_graph", [False, True])
def test_node_hooks_run_as_in_torch(name, create_graph, gen):
    """Results, and the hooks' calls, as in PyTorch (a pre-hook on ExpBackward0 was not run,
    and the gradient was silently half PyTorch's); a graph where a node fastgrad lowers or calls
    directly has hooks goes to PyTorch whole, and explain says so."""
    x0 = rand((4, 3), gen)
    for _ in range(2):
        runs = []
        for grad in (TORCH_GRAD, FAST_GRAD):
            calls = []
            x = x0.clone().requires_grad_(True)
            y = NODE_HOOK_CASES[name](x, calls)
            res = grad(y, x, create_graph=create_graph, retain_graph=True)
            if create_graph:
                res = res + grad((res[0] * x).sum(), x)
            runs.append((res, calls))
        (want, want_calls), (got, got_calls) = runs
        assert_same(got, want, what=name)
        assert got_calls == want_calls, (got_calls, want_calls)
        assert len(want_calls) > 0 or name == "removed_prehook"
    x = x0.clone().requires_grad_(True)
    rep = fastgrad.explain(NODE_HOOK_CASES[name](x, []), x, create_graph=create_graph)
    if name in NODE_HOOKS_NATIVE:
        assert rep.native and all(w != "<whole call>" for w, _ in rep.fallback), rep
    else:
        assert rep.fallback == [("<whole call>", engine.NODE_HOOKS_REASON)], rep


def test_a_node_probed_for_hooks_is_left_as_it_was(gen):
    """Asking a node for its hooks registers nothing on it: its first real hook still finds
    none, and PyTorch's result is unchanged by the asking."""
    x = rand((5,), gen).requires_grad_(True)
    y = torch.exp(x)
    assert hooks._node_dicts(y.grad_fn) == ()
    assert hooks._node_dicts(y.grad_fn) == ()
    y.grad_fn.register_prehook(lambda go: None)
    (pre,) = hooks._node_dicts(y.grad_fn)
    assert len(pre) == 1
    assert_same(TORCH_GRAD(y.sum(), x), torch.exp(x.detach()))


def test_node_hooks_are_asked_for_only_while_a_hooked_node_lives(gen):
    """A node hook's dict goes with its node (torch.compile registers some on graphs it traces
    and drops): then calls stop asking nodes for hooks."""
    import gc
    live = hooks._STATE["live"]
    x = rand((3,), gen).requires_grad_(True)
    y = torch.exp(x)
    y.grad_fn.register_prehook(lambda go: None)
    assert hooks._STATE["live"] == live + 1 and hooks.node_hooks_used()
    del y
    gc.collect()
    assert hooks._STATE["live"] == live


def test_tensor_hooks_are_not_counted_as_node_hooks(gen):
    before = hooks._STATE["node"]
    x = rand((3,), gen).requires_grad_(True)
    torch.sin(x).register_hook(lambda g: g)
    assert hooks._STATE["node"] == before
    torch.sin(x).grad_fn.register_prehook(lambda go: None)
    assert hooks._STATE["node"] == before + 1


@pytest.mark.parametrize("mode", ["all", "any"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_multi_grad_hooks_like_torch(mode, create_graph, gen):
    """torch.autograd.graph.register_multi_grad_hook (FSDP uses it) reads the state of
    PyTorch's engine in its tensor hooks ("expected this hook to be called inside a backward
    call" was raised under fastgrad): such graphs go to PyTorch, and explain says so."""
    x0 = rand((4, 3), gen)

    def run(grad):
        x = x0.clone().requires_grad_(True)
        a, b = torch.sin(x), torch.exp(x)
        seen = []

        def fn(gs):
            seen.append([g.clone() for g in gs if g is not None] if mode == "all" else [gs])
        torch.autograd.graph.register_multi_grad_hook((a, b), fn, mode=mode)
        y = (a * b).sum()
        return grad(y, x, create_graph=create_graph, retain_graph=True), seen, (y, x)
    (want, want_seen, _), (got, got_seen, (y, x)) = run(TORCH_GRAD), run(FAST_GRAD)
    assert_same(got, want)
    assert len(got_seen) == len(want_seen) == 1
    assert_same(got_seen[0], want_seen[0])
    rep = fastgrad.explain(y, x)
    assert rep.fallback == [("<whole call>", sweep.TORCH_HOOKS_REASON)], rep


def test_a_partial_of_a_torch_function_counts_as_torchs_hook(gen):
    """FSDP registers functools.partial(a hook of its own, ...): found through the partial; a
    partial of the user's own function stays the user's (run natively)."""
    import functools
    x = rand((3,), gen).requires_grad_(True)
    mine, theirs = torch.sin(x), torch.cos(x)
    mine.register_hook(functools.partial(lambda g, k: g * k, k=2.0))
    theirs.register_hook(functools.partial(torch.nn.functional.relu, inplace=False))
    assert not hooks.torch_tensor_hooks_in([mine.grad_fn])
    assert hooks.torch_tensor_hooks_in([theirs.grad_fn])


class _Named:
    """A hook object without a __name__ (PyTorch's errors then name it '<unknown>')."""

    def __call__(self, g):
        return g.sum()


_BAD_RESULTS = {
    # name: hook returning something PyTorch refuses in the gradient's place
    "another shape": lambda g: g.sum(),
    "another dtype": lambda g: g.float(),
    "not a tensor": lambda g: 3,
    "another shape, unnamed hook": _Named(),
}
_GRAPHS = {"short": lambda h: (h * 2).sum(), "long": lambda h: (h * 2).exp().sum()}


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("graph", sorted(_GRAPHS))
@pytest.mark.parametrize("bad", sorted(_BAD_RESULTS))
def test_a_hook_result_pytorch_refuses_raises_its_error(bad, graph, create_graph, gen):
    x0 = rand((2, 3), gen)

    def call(grad):
        x = x0.clone().requires_grad_(True)
        h = x.sin()
        h.register_hook(_BAD_RESULTS[bad])
        return grad(_GRAPHS[graph](h), x, create_graph=create_graph)
    assert_same_error(lambda: call(TORCH_GRAD), lambda: call(FAST_GRAD))


def test_a_hook_result_pytorch_takes_is_taken(gen):
    """A result of another memory layout (non-contiguous) or requiring grad is PyTorch's to
    judge too: it takes them."""
    x0 = rand((3, 3), gen)

    def call(grad):
        x = x0.clone().requires_grad_(True)
        h = x.sin()
        h.register_hook(lambda g: (g.t().contiguous().t() * 2))
        return grad((h * h).sum(), x)
    assert_same(call(FAST_GRAD), call(TORCH_GRAD))


def test_a_batched_call_runs_a_tensor_hook_once_as_pytorch(gen):
    x0, gos = rand((3,), gen), rand((4, 3), gen)
    seen = {}

    def call(grad):
        calls = seen.setdefault(grad, [])
        x = x0.clone().requires_grad_(True)
        h = x.sin()
        h.register_hook(lambda g: calls.append(tuple(g.shape)))
        return grad(h.exp(), x, gos, is_grads_batched=True)
    assert_same(call(FAST_GRAD), call(TORCH_GRAD))
    assert seen[FAST_GRAD] == seen[TORCH_GRAD] == [(3,)]


class _Item(Twice):
    """Twice, whose backward reads a value out of its gradient."""

    @staticmethod
    def backward(ctx, g):
        float(g.sum())  # (.item(), which vmap refuses)
        return g * 2


def test_a_batched_call_through_a_python_function_raises_as_pytorch(gen):
    x0, gos = rand((3,), gen), rand((4, 3), gen)

    def call(grad):
        x = x0.clone().requires_grad_(True)
        return grad(_Item.apply(x).sin(), x, gos, is_grads_batched=True)
    assert_same_error(lambda: call(TORCH_GRAD), lambda: call(FAST_GRAD))
