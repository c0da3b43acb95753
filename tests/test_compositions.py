"""Random compositions of the native ops a PINN or a critic is built from, at second order.

The op table (tests/test_ops.py) checks each op alone. Here each seed builds a small network on
``torch.cat([x, t], 1)``: one to three Linear layers, each followed by an activation drawn from
``ACTIVATIONS`` and sometimes a LayerNorm or a batch_norm, then a loss drawn from ``LOSSES``.
Both engines take u_x and u_t with create_graph and differentiate a mix of them again, in
float64. Results must match torch.autograd.grad and every node must be native. This is where
interactions show: a tied gradient inside a create_graph block, detached statistics, a cat's
cotangent split back.
"""
import random

import pytest
import torch

import fastgrad
from conftest import TORCH_GRAD, hardswish_splits_at_3

F = torch.nn.functional

ACTIVATIONS = [
    F.leaky_relu, F.elu, F.selu, lambda x: F.celu(x, 0.6), F.gelu,
    lambda x: F.gelu(x, approximate="tanh"), F.silu, F.mish, F.logsigmoid, F.hardtanh, F.relu6,
    F.hardswish, torch.tanh, torch.sigmoid, F.softplus, torch.sin, torch.atan, torch.asinh,
    lambda x: F.prelu(x, torch.tensor([0.3], dtype=x.dtype)), lambda x: x * 3 / 2, torch.erf,
    lambda x: torch.cosh(x * 0.3),
]


def _split_loss(h):
    a, b = h.split(1, 1)
    return (a * torch.tanh(b)).sum()


LOSSES = [
    lambda h: h.sum(),
    lambda h: F.mse_loss(h, torch.zeros_like(h)),
    lambda h: h.norm(dim=1).sum(),
    lambda h: F.cross_entropy(h, torch.arange(h.shape[0]) % 2),
    lambda h: F.huber_loss(h, torch.ones_like(h), delta=0.3),
    _split_loss,
]


_JOINS = {
    "cat": lambda x, t: torch.cat([x, t], 1),
    "cat_t_first": lambda x, t: torch.cat([t, x], 1),
    "stack": lambda x, t: torch.stack([x[:, 0], t[:, 0]], 1),
}


def _network(seed, join=_JOINS["cat"]):
    r = random.Random(seed)
    torch.manual_seed(seed)
    width, d_in, layers = r.choice([3, 5, 8]), 2, []
    for _ in range(r.randint(1, 3)):
        layers += [torch.nn.Linear(d_in, width).double(), r.choice(ACTIVATIONS)]
        if r.random() < 0.3:
            layers.append(torch.nn.LayerNorm(width).double())
        if r.random() < 0.2:
            layers.append(lambda h: F.batch_norm(h, None, None, training=True))
        d_in = width
    layers.append(torch.nn.Linear(d_in, 2).double())
    loss = r.choice(LOSSES)

    def f(x, t):
        h = join(x, t)
        for layer in layers:
            h = layer(h)
        return loss(h)
    return f


def _derivatives(G, f, x, t):
    x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
    gx, gt = G(f(x, t), (x, t), create_graph=True)
    (h,) = G((gx * gt).sum() + gx.sum(), x)
    return gx.detach(), gt.detach(), h


@pytest.mark.parametrize("seed", range(60))
def test_random_network(seed):
    f = _network(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 1, generator=g, dtype=torch.float64)
    t = torch.randn(7, 1, generator=g, dtype=torch.float64)
    want, got = _derivatives(TORCH_GRAD, f, x, t), _derivatives(fastgrad.grad, f, x, t)
    for name, w, v in zip(("u_x", "u_t", "second"), want, got):
        torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-11, equal_nan=True,
                                   msg=lambda m: f"seed {seed}, {name}: {m}")
    xx, tt = x.clone().requires_grad_(), t.clone().requires_grad_()
    report = fastgrad.explain(f(xx, tt), (xx, tt), create_graph=True)
    assert report.all_native, report


@pytest.mark.parametrize("join", sorted(_JOINS))
@pytest.mark.parametrize("seed", range(0, 60, 6))
def test_an_input_joined_to_one_that_needs_no_gradient(seed, join):
    """A PINN whose t needs no gradient: PyTorch records no size for it in the cat's node, so
    fastgrad infers it (the output's size left by the other part), natively, at second order."""
    f = _network(seed, _JOINS[join])
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(7, 1, generator=g, dtype=torch.float64)
    t = torch.randn(7, 1, generator=g, dtype=torch.float64)
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x = x0.clone().requires_grad_()
        (gx,) = G(f(x, t), x, create_graph=True)
        (h,) = G((gx * gx).sum() + gx.sum(), x)
        res.append((gx.detach(), h))
    for name, w, v in zip(("u_x", "second"), *res):
        torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-11, equal_nan=True,
                                   msg=lambda m: f"seed {seed}, {name}: {m}")
    x = x0.clone().requires_grad_()
    report = fastgrad.explain(f(x, t), x, create_graph=True)
    assert report.all_native, report


MIXED_ACTIVATIONS = {"tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
                     "softplus": lambda: torch.nn.Softplus(beta=2.0, threshold=3.0),
                     "gelu": torch.nn.GELU, "gelu_tanh": lambda: torch.nn.GELU("tanh"),
                     "relu": torch.nn.ReLU, "leaky_relu": lambda: torch.nn.LeakyReLU(0.2),
                     "elu": lambda: torch.nn.ELU(0.7), "selu": torch.nn.SELU,
                     "celu": lambda: torch.nn.CELU(1.3), "hardtanh": torch.nn.Hardtanh,
                     "relu6": torch.nn.ReLU6, "hardswish": torch.nn.Hardswish}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", sorted(MIXED_ACTIVATIONS))
def test_first_derivative_by_torch_then_fastgrad(act, dtype):
    """u_x from torch.autograd.grad (a library's, say), u_xx and u_xxx from fastgrad: u_x's graph
    holds the nodes PyTorch records for an activation's backward (TanhBackwardBackward0), which
    lower to PyTorch's own kernel formula and run natively."""
    torch.manual_seed(len(act) + (dtype == torch.float32))
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), MIXED_ACTIVATIONS[act](),
                              torch.nn.Linear(8, 8), MIXED_ACTIVATIONS[act](),
                              torch.nn.Linear(8, 1)).to(dtype)
    x = torch.randn(9, 2, dtype=dtype, requires_grad=True)
    (ux,) = TORCH_GRAD(net(x).sum(), x, create_graph=True)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        (uxx,) = G(ux[:, 0].sum(), x, create_graph=True)
        (uxxx,) = G(uxx[:, 1].sum(), x, retain_graph=True)
        res.append((uxx.detach(), uxxx))
    for name, w, v in zip(("u_xx", "u_xxx"), *res):
        torch.testing.assert_close(v, w, **tol, msg=lambda m: f"{act} {name}: {m}")
    report = fastgrad.explain(ux[:, 0].sum(), x, create_graph=True)
    assert report.all_native, report


_FAR = [7.5, -30.0, 30.0, float("inf"), -float("inf"), float("nan")]
# activation -> (it, the points where its backward's formula changes (kinks, bounds), the far
# and special values tested). Left out, where PyTorch gives NaN or not depending on how it
# computed, not on the math: gelu_tanh far out (its double backward's formula turns NaN at
# |x| = 37.5 at third order), elu's family at +inf (PyTorch multiplies the zero derivative of the
# positive side by inf), hardtanh's at NaN (its vectorised loop gives 0, its scalar loop the
# gradient: which one runs depends on the element's position), and hardswish at NaN (the same)
# and +-inf (PyTorch multiplies a zero by inf, or not, depending on the side).
BACKWARD_NODES = {
    "gelu": (F.gelu, [], _FAR),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), [], [7.5, float("nan")]),
    "relu": (F.relu, [0.0], _FAR),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), [0.0], _FAR),
    "elu": (lambda x: F.elu(x, 0.7), [0.0], [v for v in _FAR if v != float("inf")]),
    "selu": (F.selu, [0.0], [v for v in _FAR if v != float("inf")]),
    "celu": (lambda x: F.celu(x, 1.3), [0.0], [v for v in _FAR if v != float("inf")]),
    # in place: PyTorch's backward reads the output (is_result); the in-place node itself
    # (EluBackward1, CeluBackward1) falls back
    "selu_": (lambda x: F.selu(x, inplace=True), [0.0], [v for v in _FAR if v != float("inf")]),
    "celu_": (lambda x: F.celu(x, 1.3, inplace=True), [0.0],
              [v for v in _FAR if v != float("inf")]),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 1.0), [-0.5, 1.0], _FAR[:-1]),
    "relu6": (F.relu6, [0.0, 4.8], _FAR[:-1]),
    "hardswish": (F.hardswish, [-3.0, 3.0], _FAR[:3]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("act", sorted(BACKWARD_NODES))
def test_activation_backward_nodes_at_kinks_and_special_values(act, dtype):
    """The node PyTorch records for an activation's backward (GeluBackwardBackward0, ...),
    differentiated twice more by fastgrad, at its kinks, far out, at +-inf and NaN (half types
    computed in float32 and rounded once, as PyTorch's kernels do)."""
    f, kinks, far = BACKWARD_NODES[act]
    if act == "hardswish" and hardswish_splits_at_3():  # (PyTorch's own loops disagree at 3)
        kinks = [k for k in kinks if k != 3.0]
    g = torch.Generator().manual_seed(len(act))
    # (the kinks divided by the forward's 1.25, so that its input lands on them)
    x0 = torch.cat([torch.randn(40, generator=g, dtype=torch.float64) * 3,
                    torch.tensor([k / 1.25 for k in kinks] + far, dtype=torch.float64)]).to(dtype)
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x = x0.clone().requires_grad_()
        (gx,) = TORCH_GRAD((f(x * 1.25) * (x + 1.0)).sum(), x, create_graph=True)
        (h,) = G((gx * gx).sum(), x, create_graph=True)
        (k,) = G((h * h).sum(), x, retain_graph=True)
        res.append((h.detach(), k))
    # (float32 and bfloat16: PyTorch rounds after every op of the formulas, fastgrad once per
    # fused region, so the errors of the third order scale with its largest values)
    rtol, atol = {torch.float64: (1e-9, 1e-11), torch.float32: (5e-5, 1e-5),
                  torch.bfloat16: (3e-2, 3e-2)}[dtype]
    for name, w, v in zip(("second", "third"), *res):
        finite = w[torch.isfinite(w)].abs().float()
        scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
        torch.testing.assert_close(v, w, rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    x = x0.clone().requires_grad_()
    (gx,) = TORCH_GRAD((f(x * 1.25) * (x + 1.0)).sum(), x, create_graph=True)
    report = fastgrad.explain((gx * gx).sum(), x, create_graph=True)
    assert any(n.endswith("BackwardBackward0") for n in report.native), report
    in_place = [n for n, why in report.fallback if n in ("EluBackward1", "CeluBackward1")]
    assert len(report.fallback) == len(in_place) == act.endswith("_"), report


@pytest.mark.parametrize("act", sorted(BACKWARD_NODES))
def test_activation_backward_nodes_along_the_grad_output(act):
    """The derivative along the grad_output's path of an activation's backward node (w's
    gradient of u_x = f'(x) * w), then once more with respect to x: PyTorch's kernels are
    differentiable in x even where they read it only in a mask (zeros, which require grad)."""
    f = BACKWARD_NODES[act][0]
    g = torch.Generator().manual_seed(len(act))
    x0, w0 = (torch.randn(23, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        (gx,) = TORCH_GRAD((f(x * 1.5) * w).sum(), x, create_graph=True)  # (x * 1.5: f_)
        # (gx.sum(): the cotangent reaching w has no other path back to x than the kernel's)
        (hw,) = G(gx.sum(), w, create_graph=True)
        (k,) = G((hw * hw).sum(), x)
        res.append((hw.requires_grad, hw.detach(), k))
    assert res[0][0] == res[1][0]
    for w_, v in zip(res[0][1:], res[1][1:]):
        torch.testing.assert_close(v, w_, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("act", ["hardtanh", "relu6", "hardswish"])
def test_activation_backward_nodes_at_nan_in_pytorchs_scalar_loop(act):
    """At NaN PyTorch's vectorised and scalar loops disagree for these kernels; one element
    takes the scalar loop, whose values fastgrad gives: NaN passes the grad_output."""
    f = BACKWARD_NODES[act][0]
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x = torch.tensor([float("nan")], dtype=torch.float64, requires_grad=True)
        w = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        (gx,) = TORCH_GRAD((f(x) * w).sum(), x, create_graph=True)
        res.append(G(gx.sum(), w)[0])
    torch.testing.assert_close(res[1], res[0], equal_nan=True)


def test_softplus_backward_node_across_its_threshold():
    """SoftplusBackwardBackward0 on both sides of beta*x = threshold, at it, and where exp of
    the discarded branch would overflow."""
    x0 = torch.cat([torch.linspace(-4, 4, 33, dtype=torch.float64),
                    torch.tensor([1.5, 60.0, 400.0, -400.0], dtype=torch.float64)])
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x = x0.clone().requires_grad_()
        y = torch.nn.functional.softplus(x * 1.25, beta=2.0, threshold=3.0) * x
        (g,) = TORCH_GRAD(y.sum(), x, create_graph=True)
        (h,) = G((g * g).sum(), x, create_graph=True)
        (k,) = G(h.sum(), x, retain_graph=True)
        res.append((h.detach(), k))
    for name, w, v in zip(("second", "third"), *res):
        torch.testing.assert_close(v, w, rtol=1e-9, atol=1e-11, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    x = x0.clone().requires_grad_()
    (g,) = TORCH_GRAD((torch.nn.functional.softplus(x * 1.25, beta=2.0, threshold=3.0) * x).sum(),
                      x, create_graph=True)
    report = fastgrad.explain((g * g).sum(), x, create_graph=True)
    assert report.all_native, report


@pytest.mark.parametrize("forces_by", ["fastgrad", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pair_potential_forces_and_force_matching(dtype, forces_by):
    """A Lennard-Jones energy over a fixed pair list (rows gathered by index: pos[i] - pos[j]),
    its forces, and a force-matching loss's gradient (with respect to the potential's
    parameters and the positions: through the forces' graph), repeated as a training loop
    repeats it (the calls after the first hit the plan), all native; the forces taken by
    fastgrad, or by torch.autograd.grad (whose graph then holds IndexPutImplBackward0, the
    accumulating index_put of x[index]'s backward)."""
    g = torch.Generator().manual_seed(7)
    n = 24
    pos0 = torch.rand(n, 3, generator=g, dtype=torch.float64).to(dtype) * 3
    i, j = torch.triu_indices(n, n, 1)
    i, j = i[::3], j[::3]

    def energy(pos, eps, sig):
        d = pos[i] - pos[j]
        r2 = (d * d).sum(-1) + 0.5
        s6 = (sig * sig / r2) ** 3
        return (4 * eps * (s6 * s6 - s6)).sum()

    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for _ in range(4):
        res = []
        for G in (TORCH_GRAD, fastgrad.grad):
            F = G if forces_by == "fastgrad" else TORCH_GRAD
            pos = pos0.clone().requires_grad_()
            eps = torch.tensor(1.0, dtype=dtype, requires_grad=True)
            sig = torch.tensor(0.9, dtype=dtype, requires_grad=True)
            (f,) = F(energy(pos, eps, sig), pos, create_graph=True)
            loss = ((f - 0.1) ** 2).sum()
            res.append((f.detach(),) + G(loss, [eps, sig, pos]))
        for w, v in zip(*res):
            scale = max(1.0, float(w.abs().max()))
            torch.testing.assert_close(v, w, rtol=tol["rtol"], atol=tol["atol"] * scale)
    pos = pos0.clone().requires_grad_()
    eps = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    sig = torch.tensor(0.9, dtype=dtype, requires_grad=True)
    report = fastgrad.explain(energy(pos, eps, sig), pos, create_graph=True)
    assert report.all_native, report
    F = fastgrad.grad if forces_by == "fastgrad" else TORCH_GRAD
    (f,) = F(energy(pos, eps, sig), pos, create_graph=True)
    report = fastgrad.explain(((f - 0.1) ** 2).sum(), [eps, sig, pos])
    assert report.all_native, report
