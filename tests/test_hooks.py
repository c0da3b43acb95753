"""Tensor hooks (Tensor.register_hook) in graphs fastgrad differentiates: PyTorch runs them on
the gradient of the hooked tensor and uses what they return; fastgrad must too."""
import pytest
import torch

import fastgrad
from fastgrad import graph_cache

from conftest import FAST_GRAD, TORCH_GRAD, assert_same, rand


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
