"""Background compiles (fastgrad.jit.BACKGROUND): the call that reaches jit.AFTER sets the loops
the disk cache holds and leaves the others to a worker thread; until they are set the
interpreter runs their regions, with torch's results, and once jit.wait() returns they run as
loops, with torch's results too. A compile that fails there leaves the interpreter running."""
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

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


def _child(queue, fn, gen):
    # In a child forked while a compile is held: nothing in flight is its own to wait for, and
    # its regions are not said to be compiling. (One thread, as PyTorch's DataLoader workers
    # set: PyTorch's own OpenMP pool hangs in a forked child on some machines.)
    torch.set_num_threads(1)
    _, _, report = _call(fn, (2011,), gen, 1)
    queue.put((jit.wait(timeout=5), jit.status()["pending"], "compiling" in report))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_does_not_wait_for_the_parents_compiles(background, held, gen):
    fn = lambda x: torch.sin(x) * 1.75 + torch.exp(-x)  # noqa: E731
    for _ in range(jit.AFTER):
        _call(fn, (2011,), gen, 1)
    assert jit.status()["pending"] == 1
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, fn, gen))
    child.start()
    try:
        assert queue.get(timeout=60) == (True, 0, False)
    finally:
        child.join(timeout=60)
    held.set()
    assert jit.wait(timeout=300)


def test_the_worker_ends_when_the_queue_is_empty(background, gen):
    fn = lambda x: torch.tanh(x) * 2.25 - torch.sin(x)  # noqa: E731
    for _ in range(jit.AFTER):
        _call(fn, (2017,), gen, 1)
    assert jit.wait(timeout=300)
    deadline = time.monotonic() + 30
    while any(t.name == "fastgrad-jit" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the worker outlived its queue"
        time.sleep(0.01)


def test_compiles_queued_when_compiling_is_turned_off_set_no_loop(background, held, gen):
    fn = lambda x: torch.exp(x) * 0.625 + torch.cos(x)  # noqa: E731
    try:
        for _ in range(jit.AFTER):
            _call(fn, (2027,), gen, 1)
        jit.enable(False)
        held.set()
        assert jit.wait(timeout=300)
        got, ref, report = _call(fn, (2027,), gen, 1)
        assert_same(got, ref, rtol=1e-12, atol=1e-12)
        assert "compiled loop" not in report and "compiling" not in report, report
    finally:
        jit.enable(True)
    # turned on again: the plan's next run offers the regions again
    _call(fn, (2027,), gen, 1)
    assert jit.wait(timeout=300)
    got, ref, report = _call(fn, (2027,), gen, 1)
    assert_same(got, ref, rtol=1e-12, atol=1e-12)
    assert "compiled loop" in report, report


def test_wait_waits_for_the_compiles_queued_before_it(background, monkeypatch, gen):
    gate = threading.Semaphore(0)  # one compile per release
    real = jit._compile_into

    def compile_into(*args):
        assert gate.acquire(timeout=300)
        return real(*args)
    monkeypatch.setattr(jit, "_compile_into", compile_into)
    first = lambda x: torch.sin(x) * torch.tanh(x) + 0.375  # noqa: E731
    second = lambda x: torch.cos(x) * torch.tanh(x) - 0.375  # noqa: E731
    for _ in range(jit.AFTER):
        _call(first, (2039,), gen, 1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(jit.wait(timeout=120)))
    waiter.start()
    for _ in range(jit.AFTER):  # queued after the wait began: not waited for
        _call(second, (2039,), gen, 1)
    assert jit.status()["pending"] == 2
    gate.release()
    waiter.join(timeout=150)
    assert got == [True] and jit.status()["pending"] == 1
    for _ in range(8):
        gate.release()
    assert jit.wait(timeout=300) and jit.status()["pending"] == 0


class _Escape(BaseException):
    """Not an Exception (as pytest.fail's and pytest.skip's are not)."""


def test_a_compile_raising_a_base_exception_keeps_the_worker_going(background, monkeypatch,
                                                                    gen):
    real = jit._compile_into

    def escape(*args):
        raise _Escape("from the compiler")
    monkeypatch.setattr(jit, "_compile_into", escape)
    fn = lambda x: torch.exp(x) * torch.sin(x) + 0.875  # noqa: E731
    try:
        for _ in range(jit.AFTER):
            _call(fn, (2053,), gen, 1)
        assert jit.wait(timeout=300) and jit.status()["pending"] == 0
        assert "background compile" in jit.status()["reason"] and not jit.status()["enabled"]
        got, ref, report = _call(fn, (2053,), gen, 1)
        assert_same(got, ref, rtol=1e-12, atol=1e-12)
        assert "compiled loop" not in report, report
    finally:
        jit.enable(True)
    monkeypatch.setattr(jit, "_compile_into", real)
    other = lambda x: torch.exp(x) * torch.cos(x) - 0.875  # noqa: E731
    for _ in range(jit.AFTER):
        _call(other, (2053,), gen, 1)
    assert jit.wait(timeout=300)
    got, ref, report = _call(other, (2053,), gen, 1)
    assert_same(got, ref, rtol=1e-12, atol=1e-12)
    assert "compiled loop" in report, report


_EXIT_SCRIPT = """
import sys, threading, time, torch, fastgrad
from fastgrad import jit
assert jit.BACKGROUND

def check(k):  # a loop of its own per k (k + 1 steps)
    x = torch.rand(1000, dtype=torch.float64, requires_grad=True)
    y = x
    for _ in range(k + 1):
        y = torch.sin(torch.tanh(y)) + y
    (want,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
    for _ in range(jit.AFTER + 1):
        (g,) = fastgrad.grad(y, x, torch.ones_like(y), retain_graph=True)
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)

MODE = sys.argv[1]
if MODE == "queue":  # plans queued at exit: only the compile in flight is finished
    for k in range(int(sys.argv[2])):
        check(k)
    print("queued", jit.status()["pending"])
else:  # a thread of the user's reaching jit.AFTER once the interpreter is exiting
    def late():
        time.sleep(1.0)
        check(99)
        print("late ok", jit.status()["pending"], flush=True)
    threading.Thread(target=late).start()
"""


def _exit_run(tmp_path, *args):
    env = dict(os.environ, FASTGRAD_CACHE_DIR=str(tmp_path / "cache"), FASTGRAD_JIT_BACKGROUND="1")
    script = tmp_path / "exit_script.py"
    script.write_text(textwrap.dedent(_EXIT_SCRIPT))
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    loops = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".so")] \
        if (tmp_path / "cache").exists() else []
    return done.stdout, loops


def test_exit_finishes_the_compile_in_flight_and_drops_the_queue(tmp_path):
    out, loops = _exit_run(tmp_path, "queue", "8")
    assert out.startswith("queued ") and int(out.split()[1]) >= 2, out  # (still queued)
    assert len(loops) < 8, loops  # (without the exit hook, all 8 were compiled at exit)


def test_a_plan_that_reaches_after_during_exit_keeps_the_interpreter(tmp_path):
    out, loops = _exit_run(tmp_path, "late")
    assert out.strip() == "late ok 0", out
    assert loops == []
