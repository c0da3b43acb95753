"""Rows by an index (ir.gather / ir.scatter, plan_steps.IndexStep): what the op table's rows
(tests/test_ops.py: index_rows, index_select_rows, index_add_rows, pair_terms) do not show:
the kernels of the node PyTorch recorded, kept bit for bit and error for error."""
import pytest
import torch

import fastgrad
from conftest import TORCH_GRAD, assert_same_error

ROWS = torch.tensor([0, 2, 2, 5, -1, 3] * 60)


def _both(fn, x0, go=None):
    res = []
    for G in (TORCH_GRAD, fastgrad.grad):
        x = x0.clone().requires_grad_()
        y = fn(x)
        res.append(G(y, x, torch.ones_like(y) if go is None else go)[0])
    return res


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("how", ["index", "index_select"])
def test_sums_of_many_rows_are_pytorchs_bit_for_bit(how, dtype):
    # 360 rows added into 7: index_select's backward (index_add_) adds half types in float,
    # x[index]'s (index_put_) in their own type; each keeps its kernel
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(7, 3, generator=g).to(dtype)
    index = ROWS if how == "index" else ROWS.abs()
    fn = (lambda x: x[index] * 1.5) if how == "index" else \
        (lambda x: x.index_select(0, index) * 1.5)
    go = torch.randn(len(index), 3, generator=g).to(dtype)
    ref, got = _both(fn, x0, go)
    assert torch.equal(got, ref), (got - ref).abs().max()


def test_an_index_the_plans_cannot_read_falls_back_at_its_node_only():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.uint8).bool()
    for index in (mask, torch.tensor([0, 2, 2], dtype=torch.int32), torch.tensor([[0, 1]])):
        report = fastgrad.explain((x.sin()[index] ** 2).sum(), x)
        assert [name for name, _ in report.fallback] == ["IndexBackward0"], report
        ref, got = _both(lambda x: (x.sin()[index] ** 2).sum(), x.detach())
        torch.testing.assert_close(got, ref)


def test_rows_no_index_reaches_are_positive_zeros():
    # (-x[index]).sum(): rows of x that no index reaches get +0.0, as in PyTorch
    x0 = torch.randn(6, 3, dtype=torch.float64)
    for fn in (lambda x: (-x[torch.tensor([0, 3])]).sum(),
               lambda x: (-x.index_select(0, torch.tensor([0, 3]))).sum()):
        ref, got = _both(fn, x0)
        assert torch.equal(torch.signbit(got), torch.signbit(ref)), (got, ref)


@pytest.mark.parametrize("how", ["index_select", "index_add"])
def test_an_index_out_of_range_raises_pytorchs_error(how):
    # the saved index changed behind autograd's back (.data: no version bump), out of range
    def call(G):
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        s = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
        index = torch.tensor([0, 2, 4])
        y = x.index_select(0, index) if how == "index_select" else x.index_add(0, index, s)
        index.data[1] = 100
        return G((y * y).sum(), [x] if how == "index_select" else [s])

    assert_same_error(lambda: call(TORCH_GRAD), lambda: call(fastgrad.grad))
