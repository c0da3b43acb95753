"""The correctness check every case passes before it is timed: a fast wrong answer is a
failure, not a result. The tests use the same functions, so the benchmark and the test suite
cannot disagree about what "agrees with torch" means."""
import math

import torch

from .. import api
from .cases import _TORCH, get_case

# Base tolerances of the correctness check (rtol, atol), scaled by each case's ``tol``.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-7, 1e-7)}


class CheckFailed(AssertionError):
    pass


def _tolerances(dtype, scale):
    rtol, atol = TOLERANCES.get(dtype, (1e-4, 1e-5))
    return rtol * scale, atol * scale


def compare(got, ref, dtype, scale=1.0, what="result", none_is_zero=False):
    """assert_close of two tuples of tensors; atol is also scaled by max |ref| of each tensor
    (sums over a large batch carry a summation-order error proportional to their magnitude).
    ``none_is_zero``: a None result equals an all-zero tensor (torch.func gives zeros where
    autograd leaves a weight's .grad None)."""
    got, ref = tuple(got), tuple(ref)
    if len(got) != len(ref):
        raise CheckFailed(f"{what}: {len(got)} results, torch gives {len(ref)}")
    rtol, atol = _tolerances(dtype, scale)
    for i, (g, r) in enumerate(zip(got, ref)):
        if none_is_zero and (g is None) != (r is None):
            t = r if g is None else g
            if not bool((t == 0).all()):
                raise CheckFailed(f"{what}[{i}]: one side is None, the other is not zero")
            continue
        if (g is None) != (r is None):
            raise CheckFailed(f"{what}[{i}]: got {g!r}, torch gives {r!r}")
        if r is None:
            continue
        g, r = g.detach(), r.detach()
        mag = float(r.abs().max()) if r.numel() and r.is_floating_point() else 0.0
        if not math.isfinite(mag):
            mag = 0.0
        try:
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol * max(1.0, mag),
                                       equal_nan=True)
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            short = "; ".join(lines[:4])
            raise CheckFailed(f"{what}[{i}]: {short}") from None
    return True


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_case(case, n, dtype=torch.float32, device="cpu", grad=None):
    """The benchmark's correctness check: build ``case`` at size ``n`` once and differentiate
    the same graph with torch.autograd.grad and with ``grad`` (default fastgrad.grad).
    Raises CheckFailed (an AssertionError) when they disagree; returns (state, torch results)
    so the caller can reuse both."""
    if isinstance(case, str):
        case = get_case(case)
    grad = api.grad if grad is None else grad
    st = case.setup(n, dtype, device)
    ref = tuple(case.run(st, _TORCH))
    case.rewind(st)
    got = tuple(case.run(st, grad))
    _sync(device)
    compare(got, ref, dtype, case.tol, what=f"{case.name} fastgrad vs torch")
    return st, ref
