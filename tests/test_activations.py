"""Activations (python/fastgrad/activations.py) at their kinks and edges.

tests/test_ops.py checks every activation on random inputs, where none sits on a kink. Here each
one is differentiated at the values where its branches meet or its numerics could break (0, -0,
the bounds, the thresholds, large magnitudes, +-inf, NaN), to first and second order, against
torch.autograd.grad in float64, and the native path must have run.

PyTorch's own result at such a value can depend on whether its vectorised loop or its scalar
tail computed it (hardswish of NaN: NaN against 1). Each value is therefore differentiated in a
tensor of its own (the scalar loop) and as part of a long tensor (the vectorised loop); where
PyTorch's two answers differ, the value is skipped, and where they agree fastgrad must match,
to 1e-12 relative and 1e-13 absolute (terms that cancel to 0 in one formula leave 1e-15 in the
other; the derivatives here are of order 1).

An infinite grad_output (an overflow upstream) must come back as PyTorch's: +-inf times a finite
non-zero derivative, where a product rule over the activation's formula gives inf * 0 or
inf - inf = NaN (``test_infinite_grad_outputs``).
"""
import math

import pytest
import torch

import fastgrad
from conftest import assert_native, hardswish_splits_at_3

F = torch.nn.functional
SPECIALS = [0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 6.0, 0.5, -0.3, 20.0, -20.0, 20.5, 30.0, -30.0,
            100.0, -100.0, 800.0, -800.0, math.inf, -math.inf, math.nan]

# name -> activation (a function of one tensor)
ACTIVATIONS = {
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "prelu": lambda x: F.prelu(x, torch.tensor([0.25], dtype=x.dtype)),
    "elu": F.elu,
    "selu": F.selu,
    "celu": lambda x: F.celu(x, 0.7),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "logsigmoid": F.logsigmoid,
    "hardtanh": lambda x: F.hardtanh(x, -1.0, 3.0),
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "softplus": lambda x: F.softplus(x, 2.0, 10.0),
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "erf": torch.erf,
}


def _grads(G, f, x):
    """First and second derivative of f(x).sum() at x, both taken with ``G``."""
    x = x.clone().requires_grad_()
    (g,) = G(f(x).sum(), x, create_graph=True)
    if not g.requires_grad:
        return g.detach(), None
    (h,) = G(g.sum(), x, allow_unused=True)
    return g.detach(), h


def _torch_consistent(f, values):
    """Mask of the values where PyTorch's scalar and vectorised loops agree (both orders)."""
    x = torch.tensor(values * 4, dtype=torch.float64)  # long: the vectorised loop
    g_long, h_long = _grads(torch.autograd.grad, f, x)
    ok = []
    for i, v in enumerate(values):
        g1, h1 = _grads(torch.autograd.grad, f, torch.tensor([v], dtype=torch.float64))
        same = torch.equal(g1.isnan(), g_long[i:i + 1].isnan()) and \
            torch.allclose(g1, g_long[i:i + 1], equal_nan=True)
        if h1 is not None and h_long is not None:
            same = same and torch.allclose(h1, h_long[i:i + 1], equal_nan=True)
        ok.append(same)
    return ok


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_specials(name):
    f = ACTIVATIONS[name]
    ok = _torch_consistent(f, SPECIALS)
    values = [v for v, k in zip(SPECIALS, ok) if k]
    split = name == "hardswish" and hardswish_splits_at_3()  # (and at 3 on an older torch)
    assert len(values) >= len(SPECIALS) - 1 - split, f"PyTorch disagrees with itself on {SPECIALS}"
    for x in (torch.tensor(values, dtype=torch.float64),           # one loop
              torch.tensor(values * 4, dtype=torch.float64)):      # long enough for vectors
        want = _grads(torch.autograd.grad, f, x)
        got = _grads(fastgrad.grad, f, x)
        for order, (w, g) in enumerate(zip(want, got), start=1):
            assert (w is None) == (g is None), (name, order)
            if w is None:
                continue
            # (mish'' at 800 is NaN in both: PyTorch's derivative, which fastgrad's follows,
            # computes exp(800))
            torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-12, atol=1e-13,
                                       msg=lambda m: f"{name} order {order}: {m}")
        xx = x.clone().requires_grad_()
        assert_native(f(xx).sum(), xx, create_graph=True)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_infinite_grad_outputs(name):
    f = ACTIVATIONS[name]
    gen = torch.Generator().manual_seed(len(name))
    # (not at 3 for hardswish where PyTorch's own loops disagree there: 2.5)
    skip = {3.0} if name == "hardswish" and hardswish_splits_at_3() else set()
    xs = torch.cat([torch.randn(24, generator=gen, dtype=torch.float64) * 3,
                    torch.tensor([v for v in SPECIALS if math.isfinite(v) and v not in skip],
                                 dtype=torch.float64)])
    for x in (xs, xs.repeat(4)):  # (PyTorch's scalar loop, then its vectorised one)
        signs = torch.randint(0, 2, x.shape, generator=gen, dtype=torch.float64) * 2 - 1
        go = signs * math.inf
        go[::5] = torch.randn(go[::5].shape, generator=gen, dtype=torch.float64)
        want, got = [G(f(xx), xx, go)[0] for G, xx in
                     ((torch.autograd.grad, x.clone().requires_grad_()),
                      (fastgrad.grad, x.clone().requires_grad_()))]
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-13,
                                   msg=lambda m: f"{name}: {m}")
        xx = x.clone().requires_grad_()
        assert_native(f(xx), xx, go)


def test_hardswish_second_derivative_at_nan_is_zero():
    # PyTorch's double backward masks strictly inside (-3, 3), which NaN is not: 0 there, where
    # the first derivative is NaN (its vectorised loop, long tensors) in both
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(64, generator=gen, dtype=torch.float64) * 3
    x0[::9] = math.nan
    v = torch.randn(64, generator=gen, dtype=torch.float64)
    res = []
    for G in (torch.autograd.grad, fastgrad.grad):
        x = x0.clone().requires_grad_()
        (g,) = G(F.hardswish(x).sum(), x, create_graph=True)
        (h,) = G((g * v).sum(), x)
        res.append((g.detach(), h))
    for w, got in zip(res[0], res[1]):
        torch.testing.assert_close(got, w, equal_nan=True, rtol=1e-12, atol=1e-13)
    assert res[1][0][::9].isnan().all() and (res[1][1][::9] == 0).all()


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, 0.0, 0.25])
def test_prelu_with_non_finite_values(weight):
    # PyTorch's kernel selects g (x > 0) or weight * g, and x * g (else) or 0 for the weight:
    # a NaN or inf weight must not reach x > 0, nor an infinite x the weight's gradient
    x0 = torch.tensor([v for v in SPECIALS if v != 0.0] * 4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    go = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    res = []
    for G in (torch.autograd.grad, fastgrad.grad):
        x = x0.clone().requires_grad_()
        w = torch.tensor([weight], dtype=torch.float64, requires_grad=True)
        res.append(G(F.prelu(x, w), (x, w), go))
    for name, got, want in zip(("x", "weight"), res[1], res[0]):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-13,
                                   msg=lambda m: f"d/d{name} at weight {weight}: {m}")
    x = x0.clone().requires_grad_()
    w = torch.tensor([weight], dtype=torch.float64, requires_grad=True)
    assert_native(F.prelu(x, w), (x, w), go)


def test_logsigmoid_second_derivative_is_pytorchs_formula_far_out():
    # PyTorch's double backward is g * (s - 1) * s, s = sigmoid(x), not the exact derivative of
    # its backward: from x = 37 on s rounds to 1 and it gives 0, at x = 20 it is 4e-8 off, and
    # a later division by a small value (1 / logsigmoid(x)) makes that a large difference
    x0 = torch.cat([torch.linspace(-45.0, 45.0, 181, dtype=torch.float64),
                    torch.tensor([36.5, 37.0, 37.5, 700.0, -700.0], dtype=torch.float64)])
    want, got = (_grads(G, F.logsigmoid, x0)[1] for G in (torch.autograd.grad, fastgrad.grad))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
