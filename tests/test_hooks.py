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
