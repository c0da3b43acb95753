"""Shared helpers for the differential test-suite of fastgrad.

Every correctness test builds the same forward graph twice, from clones of the
same leaves: once differentiated by ``torch.autograd.grad`` (the reference) and
once by ``fastgrad.grad``.  Results are compared with
``torch.testing.assert_close`` (NaN == NaN, since several edge cases are
expected to produce NaN exactly where PyTorch does).

The reference function is captured here at import time so that a test (or the
library) patching ``torch.autograd.grad`` cannot make the reference recurse.
"""

import contextlib
import ctypes
import zlib

import pytest
import torch

import fastgrad  # noqa: F401  (a broken import must fail the whole suite)
from fastgrad import api, churn, jit

# Tests that check a plan's regions became loops after jit.AFTER runs need them set by then:
# loops are compiled in the calls that reach it here (tests/test_jit_background.py turns the
# background compiles on where it tests them).
jit.BACKGROUND = False
# Table-driven tests build graphs of one structure over many shapes, one call each: the pattern
# that fastgrad.churn hands to PyTorch. Off here, so that every test checks fastgrad's own path;
# tests/test_churn.py turns it on where it tests it.
churn.MISSES = 0
# Batched calls (is_grads_batched) over small rows go to PyTorch whole: off here for the same
# reason (tests/test_api.py turns it on where it tests it).
api.BATCHED_ROW_NUMEL = {}

# PyTorch's first float64 torch.sin of a process was once seen off by 7e-9 at one element (one
# process in three or five; later calls right), which made the engine that ran first disagree
# with the other: run PyTorch's transcendentals once before any test compares with them.
for _dtype in (torch.float32, torch.float64):
    _x = torch.linspace(-3, 3, 4099, dtype=_dtype)
    for _f in (torch.sin, torch.cos, torch.exp, torch.tanh, torch.sigmoid, torch.log1p,
               torch.expm1, torch.erf, torch.atan, torch.sinh, torch.cosh):
        _f(_x)
del _dtype, _x, _f

TORCH_GRAD = torch.autograd.grad
FAST_GRAD = fastgrad.grad


def hardswish_splits_at_3():
    """Whether PyTorch's scalar and vectorised hardswish_backward loops disagree at x = 3
    (older releases, 2.5: 1.5 against 1). fastgrad follows the vectorised loop; a test cannot
    tell which loop PyTorch ran for an element (a tensor's tail takes the scalar one)."""
    def at_3(n):
        x = torch.full((n,), 3.0, dtype=torch.float64)
        return float(torch.ops.aten.hardswish_backward(torch.ones_like(x), x)[0])
    return at_3(1) != at_3(128)


def pytest_collection_modifyitems(config, items):
    # On a torch whose graphs fastgrad cannot read (before 2.5) every call goes to PyTorch:
    # the tests of fastgrad's own paths do not apply, those of that hand-off do.
    if fastgrad.api.NATIVE:
        return
    skip = pytest.mark.skip(reason=fastgrad.api.NOT_NATIVE_REASON)
    for item in items:
        if item.path.name != "test_not_native.py":
            item.add_marker(skip)

ENGINES = {"torch": TORCH_GRAD, "fastgrad": FAST_GRAD}


# --------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------


def seed_key(nodeid):
    """The part of a test id that seeds its generator.

    The device does not change the draw: ``[cuda-float32-...]`` draws what
    ``[cpu-float32-...]`` draws, so a CUDA case compares the same values the CPU
    case does.  The CPU float64 variants of a device/dtype-parametrized test draw
    what the test drew before it was parametrized (``[cpu-float64-X]`` -> ``[X]``).
    """
    return nodeid.replace("[cuda-", "[cpu-").replace("[cpu-float64-", "[")


@pytest.fixture(autouse=True)
def _no_saved_hooks_yet():
    """Each test starts in a process in which no saved-tensor hooks were pushed, as when run
    alone: once some were, fastgrad asks each graph whether they packed a tensor of it, and a
    torch that does not show a saved tensor's hooks (2.5) sends every graph holding saved
    tensors to PyTorch (fastgrad.hooks). A test's own graphs are built inside it, so a graph
    under hooks never meets the flag down."""
    from fastgrad import hooks
    hooks._STATE["saved"] = False


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test id: reproducible, distinct per test
    (but the same on every device, see ``seed_key``)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(seed_key(request.node.nodeid).encode()))
    return g


def rand(shape, gen, domain="real", dtype=torch.float64, device="cpu"):
    """Random tensor of ``shape`` drawn from ``domain``.

    The values are always drawn in float64 on the CPU (from ``gen``, a CPU
    generator), then converted to ``dtype`` and moved to ``device``, so a test
    sees the same values whatever the device.

    real      standard normal
    positive  uniform in [0.3, 2.0]
    nonzero   |value| in [0.3, 2.0], random sign
    unit      uniform in (-0.9, 0.9)
    """
    shape = tuple(shape)
    if domain == "real":
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif domain == "positive":
        t = 0.3 + 1.7 * torch.rand(shape, generator=gen, dtype=torch.float64)
    elif domain == "nonzero":
        mag = 0.3 + 1.7 * torch.rand(shape, generator=gen, dtype=torch.float64)
        sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        t = mag * sign
    elif domain == "unit":
        t = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.9
    else:
        raise ValueError(f"unknown domain {domain!r}")
    return t.to(dtype).to(device)


def leaf(t):
    """A fresh leaf requiring grad with the same values *and strides* as ``t``."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out.requires_grad_(t.is_floating_point() or t.is_complex())


def strided_leaf(t):
    """A *non-contiguous* leaf with the values of ``t`` (transposed storage, or a
    stride-2 slice for 1-d tensors)."""
    with torch.no_grad():
        if t.dim() >= 2:
            perm = list(range(t.dim()))[::-1]
            base = t.permute(perm).contiguous()
            out = base.permute(perm)  # same values as t, reversed strides
        elif t.dim() == 1 and t.numel() > 0:
            base = torch.empty(t.shape[0] * 2, dtype=t.dtype, device=t.device)
            base[::2] = t
            base[1::2] = float("nan")  # must never be read
            out = base[::2]
        else:
            out = t.clone()
    out = out.detach().requires_grad_(True)
    return out


def as_tuple(x):
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


# --------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------


def device_skip_reason(device):
    """Why tests on ``device`` cannot run here (None when they can)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if not fastgrad._C.cuda_compiled():
            return "fastgrad built without CUDA (fastgrad._C.cuda_compiled() is False)"
        return None
    return f"no tests for device type {device.type!r}"


def requires_device(device):
    """A pytest mark skipping the test where ``device`` is unusable (no mark otherwise)."""
    reason = device_skip_reason(device)
    return [pytest.mark.skip(reason=reason)] if reason is not None else []


# a "device" parametrization: the CPU, and CUDA where it can run (skipped with the reason else)
DEVICE_PARAMS = [pytest.param(d, marks=requires_device(d)) for d in ("cpu", "cuda")]


# --------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------


def _magnitude(e):
    """Largest finite |value| of ``e`` (1.0 when there is none or it is 0)."""
    e = e.detach()
    if e.numel() == 0:
        return 1.0
    a = e.abs().to(torch.float64)
    a = a[torch.isfinite(a)]
    m = float(a.max()) if a.numel() else 0.0
    return m if m > 0 else 1.0


def assert_same(actual, expected, what="", rtol=None, atol=None, none_is_zero=False,
                atol_scale=False):
    """Compare two tuples of (Tensor | None) results.

    With ``atol_scale`` the absolute tolerance is relative to the magnitude of
    the expected values (``atol * max|expected|``): what a low-precision
    dtype can resolve near zero depends on the size of what was summed."""
    actual, expected = as_tuple(actual), as_tuple(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} results, torch gives {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        tag = f"{what}[{i}]"
        if none_is_zero:
            if a is None and e is not None:
                assert not torch.any(e != 0), f"{tag}: fastgrad gives None, torch gives {e}"
                continue
            if e is None and a is not None:
                assert not torch.any(a != 0), f"{tag}: torch gives None, fastgrad gives {a}"
                continue
        if e is None or a is None:
            assert a is None and e is None, f"{tag}: fastgrad gives {a!r}, torch gives {e!r}"
            continue
        assert isinstance(a, torch.Tensor), f"{tag}: not a tensor: {type(a)}"
        kw = {}
        if rtol is not None or atol is not None:
            kw = dict(rtol=rtol if rtol is not None else 1e-7, atol=atol if atol is not None else 1e-7)
            if atol_scale:
                kw["atol"] *= _magnitude(e)
        torch.testing.assert_close(
            a.detach(), e.detach(), equal_nan=True, msg=lambda m: f"{tag}: {m}", **kw
        )


def assert_same_error(run_torch, run_fast):
    """Both callables raise: same exception type and same message."""
    try:
        run_torch()
    except Exception as e:  # noqa: BLE001
        te = e
    else:
        pytest.fail("test setup bug: torch.autograd.grad did not raise")
    try:
        run_fast()
    except Exception as e:  # noqa: BLE001
        fe = e
    else:
        pytest.fail(f"fastgrad.grad did not raise; torch raises {type(te).__name__}: {te}")
    assert type(fe) is type(te), f"fastgrad raises {type(fe).__name__}: {fe}\ntorch raises {type(te).__name__}: {te}"
    assert str(fe) == str(te), f"message differs\nfastgrad: {fe}\ntorch:    {te}"


class Twice(torch.autograd.Function):
    """x * 2 as a Python Function saving nothing (a fallback node PyTorch runs)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


# --------------------------------------------------------------------------
# the differential driver
# --------------------------------------------------------------------------


class _Cotangents:
    """Random cotangent vectors shared by both engines (created on first use)."""

    def __init__(self, gen, domain="real"):
        self.gen = gen
        self.cache = {}
        self.domain = domain

    def get(self, key, like):
        if key not in self.cache:
            self.cache[key] = rand(like.shape, self.gen, self.domain, dtype=like.dtype,
                                   device=like.device)
        v = self.cache[key]
        assert v.shape == like.shape, f"{key}: shape {tuple(like.shape)} != {tuple(v.shape)}"
        return v


def run_chain(engine, fn, inputs, grad_outputs, orders, cot, prep=None, wrt="leaves",
              leaf_fn=leaf, explain_levels=None):
    """Build the graph from fresh leaves and differentiate ``orders`` times.

    Level 1 differentiates ``fn(*xs)`` with ``grad_outputs``; level k>1
    differentiates ``sum_i (g_i * v_i).sum()`` of the level k-1 results that
    require grad, with random ``v_i`` from ``cot``.  Returns a list of
    (results, requires_grad flags) per level.  If ``explain_levels`` is a list,
    the graphs differentiated at each level are passed to fastgrad.explain and
    the reports appended.
    """
    leaves = [leaf_fn(t) for t in inputs]
    xs = list(prep(*leaves)) if prep is not None else leaves
    targets = leaves if wrt == "leaves" else xs
    outs = as_tuple(fn(*xs))
    gos = grad_outputs
    if callable(gos):
        gos = gos(outs)
    levels = []
    cur_outs, cur_gos = outs, gos
    for level in range(1, orders + 1):
        create = level < orders
        if explain_levels is not None:
            explain_levels.append(
                fastgrad.explain(cur_outs, targets, grad_outputs=cur_gos, create_graph=create,
                                 allow_unused=True if level > 1 else None)
            )
        kwargs = dict(create_graph=create)
        if level > 1:
            kwargs["allow_unused"] = True
        res = engine(cur_outs, targets, grad_outputs=cur_gos, **kwargs)
        flags = tuple(None if r is None else r.requires_grad for r in res)
        levels.append((tuple(res), flags))
        if not create:
            break
        terms = [
            (r * cot.get((level, i), r)).sum()
            for i, r in enumerate(res)
            if r is not None and r.requires_grad
        ]
        if not terms:
            break
        s = terms[0]
        for t in terms[1:]:
            s = s + t
        cur_outs, cur_gos = (s,), None
    return levels


def check_grad(fn, inputs, grad_outputs="random", orders=1, gen=None, prep=None, wrt="leaves",
               leaf_fn=leaf, rtol=None, atol=None, native=False, atol_scale=False):
    """Differential check of fastgrad.grad against torch.autograd.grad.

    fn            builds the forward graph from the (prepared) inputs; returns a
                  tensor or a tuple of tensors
    inputs        template tensors; each engine differentiates fresh clones
    grad_outputs  "random" (same random cotangents for both engines), None, or
                  a callable outputs -> grad_outputs
    orders        1, 2 or 3 (see ``run_chain``)
    prep          optional leaves -> forward inputs (e.g. to make views)
    wrt           "leaves" or "prepped": differentiate w.r.t. the leaves or the
                  (possibly non-leaf) prepared inputs
    native        also require ``fastgrad.explain`` to report all-native at every level
    rtol, atol    tolerances (default: torch.testing.assert_close's for the dtype);
                  ``atol_scale`` makes atol relative to max|expected| (see assert_same)
    """
    if gen is None:
        gen = torch.Generator().manual_seed(0)
    cot = _Cotangents(gen)
    if grad_outputs == "random":
        def grad_outputs(outs):  # noqa: F811
            return tuple(cot.get(("go", i), o) for i, o in enumerate(outs))

    try:
        ref = run_chain(TORCH_GRAD, fn, inputs, grad_outputs, orders, cot, prep, wrt, leaf_fn)
    except RuntimeError as e:
        # older releases lack some CPU kernels for half types (torch 2.5: mse_loss's for
        # bfloat16, its backward's for float16): nothing to compare with
        if "not implemented for" not in str(e):
            raise
        pytest.skip(f"torch {torch.__version__}: {e}")
    reports = [] if native else None
    got = run_chain(FAST_GRAD, fn, inputs, grad_outputs, orders, cot, prep, wrt, leaf_fn,
                    explain_levels=reports)
    for level, ((r_res, r_flags), (g_res, g_flags)) in enumerate(zip(ref, got), start=1):
        assert_same(g_res, r_res, what=f"order {level}", rtol=rtol, atol=atol,
                    none_is_zero=level > 1, atol_scale=atol_scale)
        if level < orders:
            assert g_flags == r_flags, (
                f"order {level} (create_graph=True): requires_grad of results "
                f"fastgrad {g_flags} vs torch {r_flags}"
            )
    assert len(got) == len(ref), f"fastgrad went {len(got)} levels deep, torch {len(ref)}"
    if native:
        for level, rep in enumerate(reports, start=1):
            _assert_report_native(rep, f"level {level}")
    return got


def _assert_report_native(report, what=""):
    assert report.all_native, f"{what}: not all native\n{report}"
    assert not report.fallback, f"{what}: all_native but fallback={report.fallback}\n{report}"


def assert_native(outputs, inputs, grad_outputs=None, create_graph=False, allow_unused=None):
    """fastgrad.explain reports every node of the graph as native."""
    report = fastgrad.explain(outputs, inputs, grad_outputs=grad_outputs,
                              create_graph=create_graph, allow_unused=allow_unused)
    _assert_report_native(report)
    assert len(report.native) > 0, f"no native node reported\n{report}"
    return report


def check_native(fn, inputs, grad_outputs="random", orders=1, gen=None, prep=None, wrt="leaves",
                 leaf_fn=leaf):
    """Only the native-path claim: at every differentiation level (the first
    with create_graph=(orders > 1), the next ones on fastgrad's own results)
    ``fastgrad.explain`` reports all-native.  Returns the reports."""
    if gen is None:
        gen = torch.Generator().manual_seed(0)
    cot = _Cotangents(gen)
    if grad_outputs == "random":
        def grad_outputs(outs):  # noqa: F811
            return tuple(cot.get(("go", i), o) for i, o in enumerate(outs))
    reports = []
    run_chain(FAST_GRAD, fn, inputs, grad_outputs, orders, cot, prep, wrt, leaf_fn,
              explain_levels=reports)
    assert len(reports) >= 1
    for level, rep in enumerate(reports, start=1):
        _assert_report_native(rep, f"level {level}")
        assert len(rep.native) > 0, f"level {level}: no native node reported\n{rep}"
    return reports


@contextlib.contextmanager
def recompute(on, device):
    """fastgrad.plan.RECOMPUTE for ``device`` set to ``on`` (whether plans compute saved values
    again instead of loading them), with plans and cached sweeps made anew, and put back."""
    from fastgrad import graph_cache, plan
    key = torch.device(device).type
    before = plan.RECOMPUTE[key]
    plan.RECOMPUTE[key] = on
    plan.clear_plan_cache()
    graph_cache.clear()
    try:
        yield
    finally:
        plan.RECOMPUTE[key] = before
        plan.clear_plan_cache()
        graph_cache.clear()


@contextlib.contextmanager
def stand_in_driver(launch, get_current, push, pop, nparams):
    """The CUDA driver calls _C launches kernels through (csrc/kernel_launch.h), replaced by
    Python functions for the block (no GPU needed), then the ones bound before put back.
    ``launch(func, grid, block, shared_bytes, stream, values, extra)`` receives the first
    ``nparams()`` kernel parameters' values (a null stream arrives as None); ``get_current()``
    returns the current context; ``push(ctx)`` and ``pop()`` make and unmake one current. Each
    returns a CUresult (0: success)."""
    c_int, c_uint, c_void_p = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
    p_void = ctypes.POINTER(c_void_p)

    def launch_c(func, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        vals = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_uint64))[0]
                for i in range(nparams())]
        return launch(func, (gx, gy, gz), (bx, by, bz), shared, stream, vals, extra)

    def get_current_c(out):
        out[0] = get_current()
        return 0

    def pop_c(out):
        return pop()

    calls = [  # (kept referenced while bound)
        ctypes.CFUNCTYPE(c_int, c_void_p, *[c_uint] * 7, c_void_p, p_void, c_void_p)(launch_c),
        ctypes.CFUNCTYPE(c_int, p_void)(get_current_c),
        ctypes.CFUNCTYPE(c_int, c_void_p)(push),
        ctypes.CFUNCTYPE(c_int, p_void)(pop_c)]
    before = fastgrad._C.cuda_bind_driver(*[ctypes.cast(f, c_void_p).value for f in calls])
    try:
        yield
    finally:
        fastgrad._C.cuda_bind_driver(*before)
