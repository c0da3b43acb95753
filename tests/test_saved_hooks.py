"""Saved-tensor hooks (saved_tensors_hooks, save_on_cpu, non-reentrant checkpointing) in graphs
fastgrad is asked to differentiate: PyTorch unpacks each saved tensor once per backward, and
hooks may count on that. fastgrad hands a graph holding a tensor such hooks packed to PyTorch
(csrc/saved_tensors.h), and differentiates the graphs without them as before."""
import itertools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastgrad
from fastgrad import engine, graph_cache, hooks, node_view

from conftest import FAST_GRAD, TORCH_GRAD, assert_same, rand


def _counted(n):
    """Hooks that count their unpacks in n["unpack"]."""
    def unpack(t):
        n["unpack"] += 1
        return t
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack)


def _one_shot(n):
    """Hooks whose unpack can run once per packed tensor (it pops what pack stored)."""
    store, keys = {}, itertools.count()

    def pack(t):
        k = next(keys)
        store[k] = t
        return k

    def unpack(k):
        n["unpack"] += 1
        return store.pop(k)
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _one_shot_on(t, n):
    """``t`` (a tensor made by a node that saved its result) with one-shot hooks put on that
    saved tensor alone (SavedTensor.register_hooks: no context pushed)."""
    store = {}

    def pack(v):
        store[0] = v
        return 0

    def unpack(k):
        n["unpack"] += 1
        return store.pop(k)
    t.grad_fn._raw_saved_result.register_hooks(pack, unpack)
    return t


def _segment(n):
    def seg(x):
        n["forward"] += 1
        return torch.tanh(torch.sin(x) * x) * torch.exp(x)
    return seg


# name -> (x, n) -> a scalar output; n counts the hooks' unpacks and a segment's forward runs
SAVED_HOOK_CASES = {
    "counted_unpacks": lambda x, n: _under(_counted(n), lambda: (torch.sin(x) * torch.exp(x)).sum()),
    "one_shot_unpack": lambda x, n: _under(_one_shot(n), lambda: (torch.tanh(x) ** 3).sum()),
    "one_shot_softmax": lambda x, n: _under(
        _one_shot(n), lambda: (torch.softmax(x.reshape(4, -1), 1) * x.reshape(4, -1)).sum()),
    "non_reentrant_checkpoint": lambda x, n: checkpoint(_segment(n), x, use_reentrant=False).sum(),
    "save_on_cpu": lambda x, n: _under(torch.autograd.graph.save_on_cpu(),
                                       lambda: (torch.sigmoid(x) * torch.cos(x)).sum()),
    "register_hooks_on_one": lambda x, n: (_one_shot_on(torch.exp(x), n) * torch.sin(x)).sum(),
    "hooks_on_part": lambda x, n: (torch.exp(x) * _under(_one_shot(n), lambda: torch.sin(x) ** 2)).sum(),
}


def _under(ctx, build):
    with ctx:
        return build()


def _run(grad, name, x0, create_graph):
    """(results or the error raised, counts): under create_graph a second call differentiates
    the first's result, whose graph passes through the hooked nodes again (PyTorch's engine
    raises there for a one-shot unpack: the hook's value is gone)."""
    n = {"unpack": 0, "forward": 0}
    x = x0.clone().requires_grad_(True)
    y = SAVED_HOOK_CASES[name](x, n)
    try:
        res = grad(y, x, create_graph=create_graph)
        if create_graph:
            res = res + grad((res[0] * x).sum(), x)
    except Exception as e:  # noqa: BLE001 - compared with PyTorch's
        return (type(e), str(e)), n
    return res, n


@pytest.mark.parametrize("name", list(SAVED_HOOK_CASES))
@pytest.mark.parametrize("create_graph", [False, True])
def test_saved_tensor_hooks_run_as_in_torch(name, create_graph, gen):
    """Results (or errors), and how often the hooks unpack and a checkpointed segment runs, as
    in PyTorch (a one-shot unpack raised KeyError, and a segment ran nine times instead of
    two)."""
    x0 = rand((4, 6), gen)
    for _ in range(2):  # (the second time with the first call's sweep cached, if any)
        got, n_got = _run(FAST_GRAD, name, x0, create_graph)
        want, n_want = _run(TORCH_GRAD, name, x0, create_graph)
        if isinstance(want[0], type):
            assert got == want, name
        else:
            assert_same(got, want, what=name)
        assert n_got == n_want, (name, n_got, n_want)


def test_explain_says_why_a_hooked_graph_goes_to_torch(gen):
    counts = []
    for run in (lambda y, x: TORCH_GRAD(y, x, retain_graph=True), fastgrad.explain):
        n = {"unpack": 0}
        x = rand((5,), gen).requires_grad_(True)
        y = _under(_counted(n), lambda: (torch.sin(x) * torch.exp(x)).sum())
        rep = run(y, x)
        counts.append(n["unpack"])
    assert rep.fallback == [("<whole call>", engine.SAVED_HOOKS_REASON)], rep
    assert counts[1] == counts[0] > 0


def test_graphs_without_hooks_stay_native_after_hooks_were_used(gen):
    """Hooks used once in the process send only the graphs holding a tensor they packed to
    PyTorch; where PyTorch does not show a saved tensor's hook (2.5), every graph whose lowered
    nodes hold saved tensors goes (explain says so), with the same results."""
    x = rand((5,), gen).requires_grad_(True)
    _under(_counted({"unpack": 0}), lambda: torch.exp(x))
    assert hooks.saved_hooks_used()
    y = (torch.sin(x) * torch.exp(x)).sum()
    rep = fastgrad.explain(y, x)
    if node_view.shows_saved_tensor_hooks():
        assert rep.all_native, rep
    else:
        assert rep.fallback == [("<whole call>", engine.SAVED_HOOKS_REASON)], rep
    assert_same(FAST_GRAD(y, x, retain_graph=True), TORCH_GRAD(y, x))


@pytest.mark.parametrize("first", ["torch", "fastgrad"])
def test_a_freed_graph_raises_torchs_error_after_hooks_were_used(first, gen):
    """A graph freed by a first call (PyTorch's, or fastgrad's, which leaves its own hooks on
    each saved tensor), differentiated again once saved-tensor hooks were used: PyTorch's
    freed-graph error, whichever engine runs it (fastgrad's check reads the freed SavedTensors
    without unpacking them)."""
    _under(_counted({"unpack": 0}), lambda: torch.exp(rand((2,), gen).requires_grad_(True)))
    errors = []
    for again in (TORCH_GRAD, FAST_GRAD):
        x = rand((5,), gen).requires_grad_(True)
        y = (torch.sin(x) * torch.exp(x)).sum()
        (TORCH_GRAD if first == "torch" else FAST_GRAD)(y, x)
        with pytest.raises(RuntimeError) as e:
            again(y, x)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "second time" in errors[0]


def test_no_sweep_is_cached_for_a_hooked_graph(gen):
    graph_cache.clear()
    x = rand((5,), gen).requires_grad_(True)
    for _ in range(2):
        FAST_GRAD(_under(_counted({"unpack": 0}), lambda: (torch.tanh(x) ** 3).sum()), x)
    assert len(graph_cache._ENTRIES) == 0
