"""Deep graphs: a chain of hundreds of elementwise steps (an unrolled solver, say), which
PyTorch's engine differentiates like any other. fastgrad's plan computes such a chain in
regions no deeper than plan.MAX_DEPTH nodes (its emitter follows an expression by recursion,
which past a few hundred nodes exceeded Python's recursion limit and raised where PyTorch
works), first and second order, natively, with saved values loaded and computed again.
"""
import pytest
import torch

import fastgrad
from conftest import DEVICE_PARAMS, FAST_GRAD, TORCH_GRAD, assert_same, rand, recompute


def _chain(x, steps, step=lambda h: torch.tanh(h) * 0.9 + torch.sin(h) * 0.1):
    h = x
    for _ in range(steps):
        h = step(h)
    return h


# steps of a chain with a reduction or a view in each (their rules reach past the incoming
# cotangent: the sweep once walked it all again at every node)
STEPS = [
    ("softmax", lambda h: h - 0.1 * torch.softmax(h, -1)),
    ("norm", lambda h: h / h.norm(dim=-1, keepdim=True) + 0.01 * h),
    ("mean", lambda h: 0.5 * torch.sin(h) + 0.5 * torch.cos(h) * h.mean()),
    ("views", lambda h: torch.tanh(h.t().reshape(16, 8).t().reshape(8, 16)) + 0.1 * h),
]


@pytest.mark.parametrize("name,step", STEPS, ids=[s[0] for s in STEPS])
def test_a_long_chain_of_reductions_and_views_matches(name, step, gen):
    x0 = rand((8, 16), gen)
    got, want = (grad(_chain(x, 150, step).sum(), x)
                 for grad, x in ((FAST_GRAD, x0.clone().requires_grad_()),
                                 (TORCH_GRAD, x0.clone().requires_grad_())))
    assert_same(got, want)
    x = x0.clone().requires_grad_()
    assert fastgrad.explain(_chain(x, 150, step).sum(), x).all_native


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("steps,orders", [(300, 1), (120, 2)])
def test_a_long_chain_is_native_and_matches(steps, orders, on, device, gen):
    x0 = rand((257,), gen).to(device)

    def run(grad):
        x = x0.clone().requires_grad_()
        (g,) = grad((_chain(x, steps) ** 2).sum(), x, create_graph=orders > 1)
        return (g,) + (grad(g.sum(), x) if orders > 1 else ())
    with recompute(on, device):
        assert_same(run(FAST_GRAD), run(TORCH_GRAD))
        x = x0.clone().requires_grad_()
        report = fastgrad.explain((_chain(x, steps) ** 2).sum(), x)
    assert report.all_native, report.fallback
    assert sum(r.lstrip().startswith("region") for r in report.regions) > 1, report.regions
