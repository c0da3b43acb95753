"""The three examples of the seed document, with fastgrad.grad in place of
autograd.grad, each checked against torch.autograd.grad and for the native path."""

import torch

import fastgrad
from conftest import TORCH_GRAD, assert_native


def _rand34(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 4, generator=g)


def test_example1_sum():
    x = _rand34(1).requires_grad_(True)
    y = torch.sum(x)
    assert_native(y, x)
    grads = fastgrad.grad(outputs=y, inputs=x)[0]

    x_ref = x.detach().clone().requires_grad_(True)
    expected = TORCH_GRAD(outputs=torch.sum(x_ref), inputs=x_ref)[0]
    torch.testing.assert_close(grads, expected)
    assert grads.shape == (3, 4)


def test_example2_select_add_with_grad_outputs():
    x = _rand34(2).requires_grad_(True)
    y = x[:, 0] + x[:, 1]
    assert_native(y, x, grad_outputs=torch.ones_like(y))
    grads = fastgrad.grad(outputs=y, inputs=x, grad_outputs=torch.ones_like(y))[0]

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref[:, 0] + x_ref[:, 1]
    expected = TORCH_GRAD(outputs=y_ref, inputs=x_ref, grad_outputs=torch.ones_like(y_ref))[0]
    torch.testing.assert_close(grads, expected)


def test_example2_random_grad_outputs():
    # the same graph with a non-trivial cotangent (ones would hide a swapped column)
    x = _rand34(3).requires_grad_(True)
    y = x[:, 0] + x[:, 1]
    v = torch.randn(3, generator=torch.Generator().manual_seed(33))
    grads = fastgrad.grad(y, x, grad_outputs=v)[0]
    x_ref = x.detach().clone().requires_grad_(True)
    expected = TORCH_GRAD(x_ref[:, 0] + x_ref[:, 1], x_ref, grad_outputs=v)[0]
    torch.testing.assert_close(grads, expected)


def test_example3_second_derivative():
    x = _rand34(4).requires_grad_(True)
    y = x**2
    assert_native(y, x, grad_outputs=torch.ones_like(y), create_graph=True)
    grads = fastgrad.grad(outputs=y, inputs=x, grad_outputs=torch.ones_like(y), create_graph=True)[0]
    assert grads.requires_grad
    assert_native(grads, x, grad_outputs=torch.ones_like(grads))
    grads2 = fastgrad.grad(outputs=grads, inputs=x, grad_outputs=torch.ones_like(grads))[0]

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref**2
    g_ref = TORCH_GRAD(outputs=y_ref, inputs=x_ref, grad_outputs=torch.ones_like(y_ref),
                       create_graph=True)[0]
    g2_ref = TORCH_GRAD(outputs=g_ref, inputs=x_ref, grad_outputs=torch.ones_like(g_ref))[0]
    torch.testing.assert_close(grads, g_ref)
    torch.testing.assert_close(grads2, g2_ref)
    torch.testing.assert_close(grads2, torch.full_like(x, 2.0))


def test_example3_second_derivative_graph_has_region():
    x = _rand34(5).requires_grad_(True)
    y = x**2
    grads = fastgrad.grad(y, x, grad_outputs=torch.ones_like(y), create_graph=True)[0]
    report = assert_native(grads, x, grad_outputs=torch.ones_like(grads))
    assert any("Region" in n for n in report.native), str(report)
