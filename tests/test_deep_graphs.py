"""Deep graphs: a chain of hundreds of elementwise steps (an unrolled solver, say), which
PyTorch's engine differentiates like any other. fastgrad's plan computes such a chain in
regions no deeper than plan.MAX_DEPTH nodes (its emitter follows an expression by recursion,
which past a few hundred nodes exceeded Python's recursion limit and raised where PyTorch
works), first and second order, natively, with saved values loaded and computed again.
"""
import pytest
import torch

import fastgrad
from fastgrad import graph_cache, plan
from conftest import DEVICE_PARAMS, FAST_GRAD, TORCH_GRAD, assert_same, rand


def _chain(x, steps):
    h = x
    for _ in range(steps):
        h = torch.tanh(h) * 0.9 + torch.sin(h) * 0.1
    return h


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("steps,orders", [(300, 1), (120, 2)])
def test_a_long_chain_is_native_and_matches(steps, orders, recompute, device, gen):
    x0 = rand((257,), gen).to(device)
    key = torch.device(device).type
    before = plan.RECOMPUTE[key]
    plan.RECOMPUTE[key] = recompute
    plan.clear_plan_cache()
    graph_cache.clear()
    try:
        def run(grad):
            x = x0.clone().requires_grad_()
            (g,) = grad((_chain(x, steps) ** 2).sum(), x, create_graph=orders > 1)
            return (g,) + (grad(g.sum(), x) if orders > 1 else ())
        assert_same(run(FAST_GRAD), run(TORCH_GRAD))
        x = x0.clone().requires_grad_()
        report = fastgrad.explain((_chain(x, steps) ** 2).sum(), x)
    finally:
        plan.RECOMPUTE[key] = before
        plan.clear_plan_cache()
        graph_cache.clear()
    assert report.all_native, report.fallback
    assert sum(r.lstrip().startswith("region") for r in report.regions) > 1, report.regions
