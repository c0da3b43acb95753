"""A torch whose graphs fastgrad cannot read (nodes without ``_input_metadata``, before 2.5):
every call goes whole to PyTorch, whose results and errors it returns, and ``explain`` says
why. Run here with ``api.NATIVE`` patched off (on such a torch it is off already, and the rest
of the suite is skipped: conftest.py)."""
import pytest
import torch

import fastgrad
from fastgrad import _C, api
from conftest import FAST_GRAD, TORCH_GRAD, assert_same, rand


def _first(g):
    x = rand((5, 4), g).requires_grad_(True)
    return (torch.sin(x) * torch.exp(x)).sum(), x, {}


def _vjp(g):
    x = rand((5, 4), g).requires_grad_(True)
    return torch.tanh(x) ** 3, x, {"grad_outputs": rand((5, 4), g)}


def _second(g):
    x = rand((6,), g).requires_grad_(True)
    y = (torch.nn.functional.softplus(x) * torch.sigmoid(x)).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    return (gx ** 2).sum(), x, {"create_graph": True}


def _unused(g):
    x, y = rand((3,), g).requires_grad_(True), rand((3,), g).requires_grad_(True)
    return torch.cos(x).sum(), (x, y), {"allow_unused": True}


def _error(g):  # PyTorch's error: an input that does not need a gradient
    x = rand((3,), g).requires_grad_(True)
    return torch.exp(x).sum(), (x, rand((3,), g)), {}


CASES = {"first_order": _first, "vjp": _vjp, "create_graph": _second,
         "allow_unused": _unused, "torch_error": _error}


@pytest.fixture
def not_native(monkeypatch):
    """api.NATIVE off, and fastgrad's own paths made to fail if they are entered at all."""
    def entered(*a, **k):
        raise AssertionError("fastgrad's own path was entered")

    monkeypatch.setattr(api, "NATIVE", False)
    monkeypatch.setattr(api, "_run", entered)
    monkeypatch.setattr(api, "_fast", entered)
    monkeypatch.setattr(api, "_C", type("NoRepeat", (), {"repeat_call": entered,
                                                         "plain_grads": _C.plain_grads}))


@pytest.mark.parametrize("name", list(CASES))
def test_every_call_goes_to_pytorch(name, gen, not_native):
    outs, ins, kw = CASES[name](gen)
    for call in range(2):  # (a second call is where a plan cache would answer)
        try:
            ref = TORCH_GRAD(outs, ins, retain_graph=True, **kw)
        except RuntimeError as e:
            with pytest.raises(RuntimeError) as got:
                FAST_GRAD(outs, ins, retain_graph=True, **kw)
            assert str(got.value) == str(e)
            continue
        got = FAST_GRAD(outs, ins, retain_graph=True, **kw)
        assert_same(got, ref, f"call {call}", none_is_zero=False)
        if kw.get("create_graph"):  # PyTorch's own graph, differentiable again
            assert all(g.grad_fn is not None for g in got)


def test_explain_says_why(gen, not_native):
    outs, ins, _ = _first(gen)
    report = fastgrad.explain(outs, ins)
    assert not report.native and not report.all_native
    assert report.fallback == [("<whole call>", api.NOT_NATIVE_REASON)]


def test_the_probe_reads_this_torch():
    # NATIVE is what a node of this torch shows; the suite's other tests need it on
    x = torch.zeros(2, requires_grad=True)
    assert api.NATIVE == hasattr(torch.exp(x).grad_fn, "_input_metadata")
