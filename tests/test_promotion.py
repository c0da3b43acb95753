"""The dtype of an elementwise op, as PyTorch's result_type gives it (ir.result_dtype), and
the compute dtype of the regions it makes: a Python number, which PyTorch saves as a 0-d
float64 (or int64) tensor, does not widen float32 tensors, so `0.5 * x` of a float32 x is
computed in float32 as PyTorch computes it, and such a region runs as a compiled loop."""
import itertools

import pytest
import torch

import fastgrad
from fastgrad import ir, jit
from conftest import TORCH_GRAD, assert_same, rand

_DTYPES = [torch.bool, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("shape_a,shape_b", [((3,), ()), ((), (3,)), ((3,), (3,)), ((), ())])
def test_result_dtype_is_torchs(shape_a, shape_b):
    for da, db in itertools.product(_DTYPES, repeat=2):
        want = torch.result_type(torch.zeros(shape_a, dtype=da), torch.zeros(shape_b, dtype=db))
        got = ir.result_dtype((ir.leaf(0, shape_a, da), ir.leaf(1, shape_b, db)))
        assert got == want, (shape_a, da, shape_b, db)


# float32 graphs with Python numbers in them (each saved by PyTorch as a 0-d tensor), with
# dimensions or 0-d (a sum's, whose cotangent then reaches the big region)
CASES = [
    ("half_of_a_sum_w", lambda x, w: 0.5 * ((x * w) ** 2).sum() * 0.25, "w"),
    ("half_square_sum_w", lambda x, w: (0.5 * (x * w) ** 2).sum(), "w"),
    ("scaled_sin_sum_w", lambda x, w: (x * w * 0.5).sin().sum(), "w"),
    ("scaled_sin_x", lambda x, w: torch.sin(x * 0.1) * 3 + w, "x"),
    ("int_scale_x", lambda x, w: torch.tanh(x * 3) / 2, "x"),
]


@pytest.mark.parametrize("name,fn,wrt", CASES, ids=[c[0] for c in CASES])
def test_python_numbers_keep_float32_regions(monkeypatch, gen, name, fn, wrt):
    monkeypatch.setattr(jit, "AFTER", 1)  # (compiled after the first run)
    x32, w32 = rand((257, 64), gen).float(), rand((64,), gen).float()
    for _ in range(2):
        x, w = x32.clone().requires_grad_(), w32.clone().requires_grad_()
        y = fn(x, w)
        go = None if y.dim() == 0 else rand(tuple(y.shape), gen).float()
        inp = x if wrt == "x" else w
        got = fastgrad.grad(y, inp, go, retain_graph=True)
        assert_same(got, TORCH_GRAD(y, inp, go, retain_graph=True), rtol=2e-6, atol=1e-6)
        x64, w64 = x32.double().requires_grad_(), w32.double().requires_grad_()
        y64 = fn(x64, w64)
        ref64 = TORCH_GRAD(y64, x64 if wrt == "x" else w64, None if go is None else go.double())
        assert_same((got[0].double(),), ref64, rtol=1e-4, atol=1e-4)
    report = str(fastgrad.explain(y, inp, go))
    regions = [line for line in report.splitlines() if "region" in line and "[257, 64]" in line]
    assert regions and all("(torch.float32)" in r and "compiled loop" in r for r in regions), \
        report


# float32 leaves whose graph computes in float64 (x.double()): the gradient's expression is
# float64 up to its cast back to float32, and must be computed so, as PyTorch computes it
WIDENED = [
    ("sin_of_scaled_double", lambda x: (x.double() * 1e3).sin()),
    ("exp_mix", lambda x: torch.exp(x.double() * 3) * x.double()),
    ("sum_of_double", lambda x: (x.double() * 1e4).cos().sum()),
]


@pytest.mark.parametrize("name,fn", WIDENED, ids=[c[0] for c in WIDENED])
def test_a_float64_computation_of_float32_leaves_is_computed_in_float64(gen, name, fn):
    x0 = rand((301,), gen).float()
    for _ in range(2):  # (the second call meets a graph seen before)
        x = x0.clone().requires_grad_()
        y = fn(x)
        go = None if y.dim() == 0 else rand(tuple(y.shape), gen)
        got = fastgrad.grad(y, x, go, retain_graph=True)
        assert_same(got, TORCH_GRAD(y, x, go, retain_graph=True), rtol=1e-6, atol=1e-5)
    report = str(fastgrad.explain(y, x, go))
    assert "(torch.float64)" in report, report
