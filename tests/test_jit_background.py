"""Background compiles (fastgrad.jit.BACKGROUND): the call that reaches jit.AFTER sets the loops
the disk cache holds and leaves the others to a worker thread; until they are set the
interpreter runs their regions, with torch's results, and once jit.wait() returns they run as
loops, with torch's results too. A compile that fails there leaves the interpreter running."""
import multiprocessing
import threading

import pytest
import torch

import fastgrad
from fastgrad import graph_cache, jit
from fastgrad import plan as fplan
from conftest import TORCH_GRAD, assert_same, rand

pytestmark = pytest.mark.skipif(not jit.status()["enabled"], reason="FASTGRAD_JIT=0")


@pytest.fixture
def background(monkeypatch, tmp_path):
    """Background compiles on, into an empty disk cache, with no loop loaded in the process."""
    monkeypatch.setattr(jit, "BACKGROUND", True)
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_LIBS", {})
    monkeypatch.setattr(jit, "_STATE", dict(jit._STATE))
    yield
    assert jit.wait(timeout=300)  # (no compile of a test outlives it)


@pytest.fixture
def held(monkeypatch):
    """Compiles wait until the test sets the event it returns."""
    go = threading.Event()
    real = jit._compile_into

    def compile_into(*args):
        assert threading.current_thread() is not threading.main_thread(), "compiled in the call"
        assert go.wait(timeout=300)
        return real(*args)
    monkeypatch.setattr(jit, "_compile_into", compile_into)
    yield go
    go.set()


def _call(fn, shape, gen, order):
    """fastgrad's and torch's gradients of fn at fresh random x, a random grad_output; the
    explain report of fastgrad's call."""
    x = rand(shape, gen).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = fn(x), fn(xr)
    go = rand(tuple(y.shape), gen)
    if order == 1:
        got = fastgrad.grad(y, x, go, retain_graph=True)
        report = fastgrad.explain(y, x, go)
        return got, TORCH_GRAD(yr, xr, go), str(report)
    g = fastgrad.grad(y, x, go, create_graph=True)[0]
    got = fastgrad.grad(g, x, go, retain_graph=True)
    gr = TORCH_GRAD(yr, xr, go, create_graph=True)[0]
    return got, TORCH_GRAD(gr, xr, go), str(fastgrad.explain(y, x, go, create_graph=True))


CASES = [  # (name, fn, shape, order): shapes of their own, so each makes new plans and loops
    ("sin_exp", lambda x: torch.sin(x) * torch.exp(x) * 1.25, (3001,), 1),
    ("softmax_rows", lambda x: torch.softmax(x * 0.75, -1), (31, 97), 1),  # a row group
    ("tanh_cube_2nd", lambda x: torch.tanh(x * 1.5) ** 3, (2999,), 2),
]


@pytest.mark.parametrize("name,fn,shape,order", CASES, ids=[c[0] for c in CASES])
def test_the_interpreter_runs_until_the_loops_are_set(background, held, name, fn, shape,
                                                      order, gen):
    for _ in range(jit.AFTER + 2):  # the compile is held: every call interprets
        got, ref, report = _call(fn, shape, gen, order)
        assert_same(got, ref, rtol=1e-12, atol=1e-12)
    assert "compiled loop" not in report and "loop compiling in the background" in report, report
    assert jit.status()["pending"] >= 1 and not jit.wait(timeout=0)
    held.set()
    assert jit.wait(timeout=300)
    assert jit.status()["pending"] == 0 and jit.status()["compiled"] >= 1
    got, ref, report = _call(fn, shape, gen, order)
    assert_same(got, ref, rtol=1e-12, atol=1e-12)
    assert "compiled loop" in report and "compiling" not in report, report


def test_loops_in_the_disk_cache_are_set_at_once(background, monkeypatch, gen):
    fn = lambda x: torch.cos(x) * torch.tanh(x) - 0.5  # noqa: E731
    shape = (2003,)
    for _ in range(jit.AFTER):
        _call(fn, shape, gen, 1)
    assert jit.wait(timeout=300) and jit.status()["compiled"] >= 1
    # A new process (no loop loaded, no plan) with the disk cache: nothing left to compile.
    fplan.clear_plan_cache()
    graph_cache.clear()
    monkeypatch.setattr(jit, "_LIBS", {})
    monkeypatch.setattr(jit, "_compile_into", lambda *a: pytest.fail("compiled again"))
    for _ in range(jit.AFTER):
        got, ref, report = _call(fn, shape, gen, 1)
        assert_same(got, ref, rtol=1e-12, atol=1e-12)
    assert jit.status()["pending"] == 0
    assert "compiled loop" in report, report


def test_a_failed_background_compile_leaves_the_interpreter(background, monkeypatch, gen):
    monkeypatch.setattr(jit, "_command", lambda src, out: ["/nonexistent/c++", src, "-o", out])
    fn = lambda x: torch.exp(x) / (1.5 + torch.sin(x))  # noqa: E731
    shape = (1999,)
    try:
        for _ in range(jit.AFTER + 1):
            _call(fn, shape, gen, 1)
        assert jit.wait(timeout=300)
        got, ref, report = _call(fn, shape, gen, 1)
        assert_same(got, ref, rtol=1e-12, atol=1e-12)
        assert "compiled loop" not in report and "compiling" not in report, report
        assert "nonexistent" in jit.status()["reason"]
    finally:
        jit.enable(True)


def _child(queue):
    # In a child forked while a compile is held: nothing in flight is its own to wait for.
    queue.put((jit.wait(timeout=5), jit.status()["pending"]))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_does_not_wait_for_the_parents_compiles(background, held, gen):
    fn = lambda x: torch.sin(x) * 1.75 + torch.exp(-x)  # noqa: E731
    for _ in range(jit.AFTER):
        _call(fn, (2011,), gen, 1)
    assert jit.status()["pending"] == 1
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == (True, 0)
    finally:
        child.join(timeout=60)
    held.set()
    assert jit.wait(timeout=300)
