"""Compiled loops (fastgrad.jit): the generated C++ loop of a region must give torch's values
(and the interpreter's) for every op and special value, run only where it is exact (no
overlapping outputs, only the regions csrc/program.h kernel_fits accepts), take over a plan's
regions after jit.AFTER runs, and leave the interpreter running when the compiler fails."""
import ctypes
import math
import os
import threading
import time

import pytest
import torch

import fastgrad
from fastgrad import _C, jit, jit_cache, loop_source
from fastgrad import plan as fplan
from conftest import TORCH_GRAD, assert_same, rand
from test_vm import BINARY, COMPUTE, SPECIAL, UNARY, Region, inputs, tol

pytestmark = pytest.mark.skipif(not jit.status()["enabled"], reason="FASTGRAD_JIT=0")


class _Spec:
    """What loop_source.source reads of a region: loads, stores, instrs, consts (test_vm's packer)."""

    def __init__(self, r):
        self.loads, self.stores, self.instrs, self.consts = r.loads, r.stores, r.instrs, r.consts


def _programs(r, compute, nins, nouts, split=0, streaming=False):
    """(interpreted, compiled) Programs of test_vm Region r whose load i reads input i and
    store k writes output k; the loop runs over rows of dims 0..split-1 when split > 0. With
    ``streaming`` the loop's streaming variant is set as its loop, so that every run takes it,
    whatever the size of its outputs."""
    desc, consts = r.pack()
    make = lambda: C_Program(desc, consts, compute, list(range(len(r.loads))),  # noqa: E731
                             list(range(len(r.stores))), nins, nouts)
    plain, fast = make(), make()
    assert fast.kernel_fits(split)
    kinds = fast.load_kinds(split)
    inner = math.prod(r.shape[split:]) if split else None
    # (one loop computes every op here; some, e.g. the half-type roundings, keep GCC from
    # vectorising it, which the runtime would refuse, but the values must be right anyway)
    modes = [rec[2] for rec in r.stores]  # elementwise (0) or one sum per row or column (1)
    columns = bool(split) and fast.column_sums(split)
    got = jit.kernel_address(loop_source.source(_Spec(r), kinds, compute, inner, modes, columns,
                                        fast.load_dtypes()), vector_only=False)
    assert got is not None, jit.status()
    if columns:  # (a loop of the other kind of sums is refused)
        with pytest.raises(ValueError, match="column sums"):
            fast.set_kernel(got[1], got[0], split, False)
    if streaming:
        assert got[2] != 0, "no streaming variant"
    fast.set_kernel(got[2] if streaming else got[1], got[0], split, columns)
    assert fast.compiled and not plain.compiled
    return plain, fast


C_Program = _C.Program


def _run_both(r, compute, ins, outs_like, nthreads=1, split=0):
    plain, fast = _programs(r, compute, len(ins), len(outs_like), split)
    a = [torch.full_like(o, float("nan")) for o in outs_like]
    b = [torch.full_like(o, float("nan")) for o in outs_like]
    plain.run(ins, a, nthreads)
    fast.run(ins, b, nthreads)
    return a, b


def _close_to_interpreter(a, b):
    # the same op math; a transcendental may take its vector variant on one path and the
    # scalar one on the other
    tight = dict(rtol=4e-7, atol=1e-37) if a.dtype == torch.float32 else dict(rtol=1e-15, atol=1e-300)
    torch.testing.assert_close(b, a, equal_nan=True, **tight)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_every_unary_op(dtype, compute):
    x = inputs(dtype)
    names = sorted(UNARY)
    r = Region(x.shape)
    rx = r.load(x)
    outs = [torch.empty_like(x) for _ in names]
    for name, o in zip(names, outs):
        r.store(o, r.op(name, rx))
    a, b = _run_both(r, compute, [x], outs)
    for name, ai, bi in zip(names, a, b):
        torch.testing.assert_close(bi, UNARY[name](x), equal_nan=True, msg=name, **tol(dtype))
        _close_to_interpreter(ai, bi)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_every_binary_op_and_where(dtype, compute):
    v = torch.tensor(SPECIAL + [3.0, 0.25, -1.5, 7.0], dtype=dtype)
    x = torch.cat([v[:, None].expand(len(v), len(v)).flatten(), inputs(dtype, seed=1)])
    y = torch.cat([v[None, :].expand(len(v), len(v)).flatten(), inputs(dtype, seed=2)])
    names = sorted(BINARY)
    r = Region(x.shape)
    rx, ry = r.load(x), r.load(y)
    outs = [torch.empty_like(x) for _ in names + ["where"]]
    for name, o in zip(names, outs):
        r.store(o, r.op(name, rx, ry))
    r.store(outs[-1], r.op("where", r.op("gt", rx, ry), rx, r.op("mul", ry, r.const(-2.5))))
    a, b = _run_both(r, compute, [x, y], outs)
    for name, ai, bi in zip(names, a, b):
        torch.testing.assert_close(bi, BINARY[name](x, y), equal_nan=True, msg=name, **tol(dtype))
        _close_to_interpreter(ai, bi)
    torch.testing.assert_close(b[-1], torch.where(x > y, x, y * -2.5), equal_nan=True, **tol(dtype))


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_constants_and_single_value_loads(dtype, compute):
    x = rand((70001,), torch.Generator().manual_seed(4), dtype=dtype)
    s = torch.tensor(1.75, dtype=dtype)
    r = Region(x.shape)
    rx, rs = r.load(x), r.load(s, strides=[0])  # a scalar read at every element
    out = torch.empty_like(x)
    inf, nan = r.const(float("inf")), r.const(float("nan"))
    e = r.op("add", r.op("mul", rx, rs), r.const(0.1))
    r.store(out, r.op("where", r.op("gt", rx, r.const(3.0)), inf, r.op("where", r.op("lt", rx, r.const(-3.0)), nan, e)))
    for nthreads in (1, 2):  # 70001 elements: chunks on two threads
        a, b = _run_both(r, compute, [x, s], [out], nthreads)
        ref = torch.where(x > 3, torch.full_like(x, float("inf")),
                          torch.where(x < -3, torch.full_like(x, float("nan")), x * 1.75 + 0.1))
        torch.testing.assert_close(b[0], ref, equal_nan=True, **tol(dtype))
        assert torch.equal(a[0].nan_to_num(), b[0].nan_to_num())  # no transcendental: exact


@pytest.mark.parametrize("min_bytes", [-1, 1024])
@pytest.mark.parametrize("shape,split", [((70001,), 0), ((1001, 67), 1)])
def test_threads_compute_every_element_once(shape, split, min_bytes):
    # From the caches each thread computes one fixed range, the same every run (region_extents.h,
    # fixed_ranges); with the threshold at 1 KiB the same data pass from memory and threads take
    # chunks in turn. Every element comes out once, as the interpreter gives it, for any count.
    gen = torch.Generator().manual_seed(25)
    x, y = rand(shape, gen, dtype=torch.float32), rand(shape, gen, dtype=torch.float32)
    r = Region(shape)
    rx = r.load(x)
    r.store(torch.empty(shape), r.op("sub", r.op("mul", rx, r.load(y)), rx))
    _C.set_stream_min_bytes(min_bytes)
    try:
        for nthreads in (1, 2, 3):
            a, b = _run_both(r, 0, [x, y], [torch.empty(shape)], nthreads, split)
            assert torch.equal(b[0], x * y - x) and torch.equal(a[0], b[0])
    finally:
        _C.set_stream_min_bytes(-1)


@pytest.mark.parametrize("name", ["sin_cos", "or_select"])
def test_loops_that_once_stayed_scalar_vectorise(name):
    """kernel_address (vectorised loops only) accepts them: sin and cos of one float (GCC fused
    them into a sincos call without a vector variant), an `or` feeding selects."""
    x = torch.randn(4096)
    r = Region(x.shape)
    rx = r.load(x)
    if name == "sin_cos":
        v = r.op("add", r.op("mul", r.op("sin", rx), rx), r.op("cos", rx))
    else:  # (hardswish's derivative: each predicate also feeds a select of its own)
        lo, hi = r.op("le", rx, r.const(-3.0)), r.op("ge", rx, r.const(3.0))
        g = r.load(torch.randn(4096))
        mid = r.op("where", r.op("or", lo, hi), r.const(0.0), r.op("div", rx, r.const(6.0)))
        v = r.op("add", r.op("mul", r.op("where", lo, r.const(0.0), g), mid),
                 r.op("where", hi, g, r.const(0.0)))
    r.store(torch.empty_like(x), v)
    desc, consts = r.pack()
    nl = len(r.loads)
    prog = _C.Program(desc, consts, 0, list(range(nl)), [0], nl, 1)
    src = loop_source.source(_Spec(r), prog.load_kinds(0), 0, dtypes=prog.load_dtypes())
    assert jit.kernel_address(src) is not None, src


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("sdtype", [torch.int64, torch.int32, torch.bool, torch.float16,
                                    torch.bfloat16, torch.float32, torch.float64])
def test_single_values_of_other_dtypes(sdtype, dtype, compute):
    """A single value of any dtype (a Python number PyTorch saved as a 0-d int64 or float64
    tensor, as in `x * 3`) is converted once by the loop, as the interpreter converts it."""
    x = rand((5000,), torch.Generator().manual_seed(5), dtype=dtype)
    s = torch.tensor(3, dtype=sdtype) if sdtype != torch.bool else torch.tensor(True)
    r = Region(x.shape)
    out = torch.empty_like(x)
    r.store(out, r.op("mul", r.load(x), r.load(s, strides=[0])))
    a, b = _run_both(r, compute, [x, s], [out])
    torch.testing.assert_close(b[0], x * s.to(dtype), **tol(dtype))
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("shape,split", [((300, 257), 1), ((6, 1, 50, 7), 2), ((5, 4, 3), 1),
                                         ((5, 4, 3), 2), ((40000, 3), 1)])
def test_rows_and_columns(shape, split, dtype, compute):
    # exp(x - m) * g + w: m and g one value per row (dims before split), w one row for all rows
    gen = torch.Generator().manual_seed(9)
    rows, cols = shape[:split], shape[split:]
    ones = (1,) * len(cols)
    x = rand(shape, gen, dtype=dtype)
    m = rand(rows + ones, gen, dtype=dtype)
    g = rand(rows + ones, gen, dtype=dtype)
    w = rand((1,) * len(rows) + cols, gen, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    r = Region(shape)
    v = r.op("mul", r.op("exp", r.op("sub", r.load(x), r.load(m))), r.load(g))
    r.store(out, r.op("add", v, r.load(w)))
    desc, consts = r.pack()
    assert _C.Program(desc, consts, compute, [0, 1, 2, 3], [0], 4, 1).load_kinds(split) == "crrk"
    for nthreads in (1, 2):
        a, b = _run_both(r, compute, [x, m, g, w], [out], nthreads, split)
        xd, md, gd, wd = (t.double() for t in (x, m, g, w))
        loose = 1e-12 if dtype == torch.float64 else 2e-5  # (x - m, then + w: cancellation)
        torch.testing.assert_close(b[0].double(), torch.exp(xd - md) * gd + wd, rtol=loose,
                                   atol=loose)
        # a row's last elements take the scalar exp in the loop (the vector one in the
        # interpreter, or the other way round): a few ulps, which the cancellation magnifies
        torch.testing.assert_close(b[0], a[0], rtol=loose, atol=loose)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("shape", [(300, 257), (9000, 33), (4, 4096)])
def test_row_sums_and_row_groups(shape, dtype, compute):
    # softmax's VJP as a row group: s = rowsum(g * y) (a computed row, buffered), t = rowsum(g)
    # (a loaded row, summed in place), then out = y * (g - s) + t, each region a loop over the
    # rows, the group chunk of rows by chunk of rows; against the interpreter's group and torch
    gen = torch.Generator().manual_seed(12)
    y, g = rand(shape, gen, dtype=dtype), rand(shape, gen, dtype=dtype)
    rows = shape[:1] + (1,)

    def regions(s, t, out):
        a = Region(shape)
        ga = a.load(g)
        a.store(s, a.op("mul", ga, a.load(y)), mode=1)
        a.store(t, ga, mode=1)
        b = Region(shape)
        yb, gb = b.load(y), b.load(g)
        b.store(out, b.op("add", b.op("mul", yb, b.op("sub", gb, b.load(s))), b.load(t)))
        return a, b

    bufs = [torch.empty(rows, dtype=dtype), torch.empty(rows, dtype=dtype), torch.empty(shape, dtype=dtype)]
    a, b = regions(*bufs)
    pa, fa = _programs(a, compute, 2, 2, split=1)
    pb, fb = _programs(b, compute, 4, 1, split=1)
    ref_s = (g.double() * y.double()).sum(1, keepdim=True)
    ref = y.double() * (g.double() - ref_s) + g.double().sum(1, keepdim=True)
    loose = 1e-12 if dtype == torch.float64 else 1e-4
    for nthreads in (1, 2):
        got = []
        for progs in ((pa, pb), (fa, fb)):
            s, t, out = (torch.full_like(u, float("nan")) for u in bufs)
            n = _C.run_program_group(list(progs), [[g, y], [y, g, s, t]], [[s, t], [out]], 1,
                                     nthreads)
            assert n > 0 or progs[0] is pa
            got.append((s, t, out))
        (s0, t0, o0), (s1, t1, o1) = got
        torch.testing.assert_close(o1.double(), ref, rtol=loose, atol=loose)
        torch.testing.assert_close(s1.double(), ref_s, rtol=loose, atol=loose)
        torch.testing.assert_close(o1, o0, rtol=loose, atol=loose)  # the interpreter's group
        if compute == 0:  # float sums: the interpreter's bits (seg_sum's lanes and tree)
            assert torch.equal(t1, t0) and torch.equal(s1, s0)
        else:  # (double: the interpreter's blocks may split a row, another order)
            torch.testing.assert_close(t1, t0, rtol=loose, atol=loose)
    # a member without a loop: the whole group runs in the interpreter
    s, t, out = (torch.full_like(u, float("nan")) for u in bufs)
    _C.run_program_group([fa, pb], [[g, y], [y, g, s, t]], [[s, t], [out]], 1, 1)
    torch.testing.assert_close(out.double(), ref, rtol=loose, atol=loose)


def _unaligned(shape, dtype):
    """An empty contiguous tensor whose data starts one element past a 64-byte boundary."""
    return torch.empty(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("shape,split", [((4099,), 0), ((37, 96), 1), ((5, 2560), 1),
                                         ((6, 7, 32), 2)])
def test_streaming_variant(shape, split, dtype, compute):
    # out = (exp(x - m) * y, x + y): x and y contiguous, m one value per row (or one value);
    # plus, over rows, t = rowsum(x), the sum of a loaded row (added after the columns); the
    # last elements of a loop over elements are not a whole line. Against the interpreter and
    # torch, on one and two threads (whose chunks start on lines).
    gen = torch.Generator().manual_seed(21)
    rows = shape[:split]
    x, y = rand(shape, gen, dtype=dtype), rand(shape, gen, dtype=dtype)
    m = rand(rows + (1,) * (len(shape) - split), gen, dtype=dtype)
    outs = [torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)]
    r = Region(shape)
    xr, yr = r.load(x), r.load(y)
    r.store(outs[0], r.op("mul", r.op("exp", r.op("sub", xr, r.load(m))), yr))
    r.store(outs[1], r.op("add", xr, yr))
    ins = [x, y, m]
    if split:
        outs.append(torch.empty(rows + (1,) * (len(shape) - split), dtype=dtype))
        r.store(outs[2], xr, mode=1)
    xd, yd, md = (t.double() for t in (x, y, m))
    want = [torch.exp(xd - md) * yd, xd + yd]
    if split:
        want.append(xd.sum(tuple(range(split, len(shape))), keepdim=True))
    plain, fast = _programs(r, compute, 3, len(outs), split, streaming=True)
    for nthreads in (1, 2):
        a = [torch.full_like(o, float("nan")) for o in outs]
        b = [torch.full_like(o, float("nan")) for o in outs]
        plain.run(ins, a, nthreads)
        assert fast.run(ins, b, nthreads)
        loose = 1e-12 if dtype == torch.float64 else 2e-5
        for got, interp, ref in zip(b, a, want):
            torch.testing.assert_close(got.double(), ref, rtol=loose, atol=loose)
            torch.testing.assert_close(got, interp, rtol=loose, atol=loose)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_streaming_only_into_whole_lines(dtype, compute):
    # 8 MiB outputs, so that a run takes the streaming variant where it can: an output that
    # does not start on a cache line (a view one element in) takes the plain loop (streaming
    # stores there would fault), and so does rows that are not whole lines
    gen = torch.Generator().manual_seed(23)
    n = (8 << 20) // (4 if dtype == torch.float32 else 8)
    for shape, split in (((n,), 0), ((n // 1001 + 1, 1001), 1), ((n // 1024, 1024), 1)):
        x, y = rand(shape, gen, dtype=dtype), rand(shape, gen, dtype=dtype)
        r = Region(shape)
        out = torch.empty(shape, dtype=dtype)
        r.store(out, r.op("mul", r.load(x), r.load(y)))
        desc, consts = r.pack()
        p = C_Program(desc, consts, compute, [0, 1], [0], 2, 1)
        got = jit.kernel_address(loop_source.source(_Spec(r), p.load_kinds(split), compute,
                                            math.prod(shape[split:]) if split else None, [0],
                                            False, p.load_dtypes()))
        assert (got[2] != 0) == (shape[-1] != 1001)  # (rows of 1001: not whole lines)
        p.set_kernel(got[1], got[0], split, False, got[2])
        assert p.streaming == (got[2] != 0)
        for o in (torch.empty(shape, dtype=dtype), _unaligned(shape, dtype)):
            o.fill_(float("nan"))
            assert p.run([x, y], [o], 2)
            assert torch.equal(o, x * y)


@pytest.fixture
def stream_small():
    """Outputs of 1 KiB or more may stream (stream_policy.h), so that small tensors are timed."""
    before = _C.stream_min_bytes()
    _C.set_stream_min_bytes(1024)
    yield
    _C.set_stream_min_bytes(-1)
    assert _C.stream_min_bytes() == before


def _timed_loop(r):
    """(Program of float32 test_vm Region r reading inputs 0, 1 into output 0, its library's
    (lib, loop, streaming loop)): the loop set with its streaming variant, as the JIT sets it."""
    desc, consts = r.pack()
    p = C_Program(desc, consts, 0, [0, 1], [0], 2, 1)
    got = jit.kernel_address(loop_source.source(_Spec(r), p.load_kinds(0), 0, None, [0], False,
                                        p.load_dtypes()))
    assert got is not None and got[2] != 0
    p.set_kernel(got[1], got[0], 0, False, got[2])
    return p, got


def test_large_output_runs_time_both_stores_then_keep_the_faster(stream_small):
    # With outputs large enough to stream (the threshold lowered so a small tensor is), the
    # first runs alternate between the streaming and the plain loop, timed, and then keep one;
    # every run's result is exact, whichever kind it took.
    gen = torch.Generator().manual_seed(24)
    shape = (4096,)
    x, y = rand(shape, gen, dtype=torch.float32), rand(shape, gen, dtype=torch.float32)
    r = Region(shape)
    r.store(torch.empty(shape), r.op("mul", r.op("exp", r.load(x)), r.load(y)))
    p, got = _timed_loop(r)
    ref = torch.exp(x.double()) * y.double()
    for i in range(2 * 3 + 2):
        if i < 2 * 3:  # (three timed runs of each kind)
            assert p.stream_pick == 0
        o = torch.full(shape, float("nan"))
        assert p.run([x, y], [o], 2)
        torch.testing.assert_close(o.double(), ref, rtol=1e-6, atol=0)
    assert p.stream_pick in (1, -1)
    # a new loop is timed anew
    p.set_kernel(0, None)
    p.set_kernel(got[1], got[0], 0, False, got[2])
    assert p.stream_pick == 0


def test_stream_timing_from_several_threads(stream_small):
    # Program.run releases the GIL, so threads may time the same program at once: every run
    # stays exact and the timing still ends in a pick
    import threading
    gen = torch.Generator().manual_seed(25)
    shape = (8192,)
    x, y = rand(shape, gen, dtype=torch.float32), rand(shape, gen, dtype=torch.float32)
    r = Region(shape)
    lx = r.load(x)
    r.store(torch.empty(shape), r.op("add", r.op("mul", lx, r.load(y)), lx))
    p, _ = _timed_loop(r)
    want = x * y + x
    bad = []

    def work():
        for _ in range(10):
            o = torch.full(shape, float("nan"))
            p.run([x, y], [o], 1)
            if not torch.equal(o, want):
                bad.append(o)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    assert p.stream_pick in (1, -1)


def test_which_loops_have_a_streaming_variant():
    # over elements and over rows; not a loop adding row sums as it computes
    gen = torch.Generator().manual_seed(22)
    x, y = rand((64, 32), gen, dtype=torch.float32), rand((64, 32), gen, dtype=torch.float32)
    out, s = torch.empty(64, 32), torch.empty(64, 1)

    def variant(build, split):
        r = Region([64, 32])
        build(r)
        desc, consts = r.pack()
        p = C_Program(desc, consts, 0, list(range(len(r.loads))), list(range(len(r.stores))),
                      len(r.loads), len(r.stores))
        modes = [rec[2] for rec in r.stores]
        got = jit.kernel_address(loop_source.source(_Spec(r), p.load_kinds(split), 0,
                                            32 if split else None, modes, False, p.load_dtypes()))
        return got[2] != 0

    two = lambda r: r.store(out, r.op("mul", r.load(x), r.load(y)))  # noqa: E731

    def one(r):
        xr = r.load(x)
        r.store(out, r.op("mul", xr, xr))

    def with_sum(r):
        v = r.op("mul", r.load(x), r.load(y))
        r.store(out, v)
        r.store(s, v, mode=1)
    assert variant(two, 0) and variant(two, 1) and variant(one, 1) and variant(one, 0)
    assert not variant(with_sum, 1)


@pytest.mark.parametrize("name,fn,shape,dtype", [
    ("softmax", lambda x: torch.softmax(x, 1), (8192, 256), torch.float32),  # a row group
    ("softmax64", lambda x: torch.softmax(x, 1), (4096, 256), torch.float64),
    ("logsumexp", lambda x: torch.logsumexp(x, 1), (8192, 256), torch.float32),  # rows
    ("sin_exp", lambda x: torch.sin(x) * torch.exp(x), (1 << 21,), torch.float32),  # elements
])
def test_large_outputs_stream(name, fn, shape, dtype, gen):
    # 8 MiB outputs (stream_policy.h, stream_min_bytes): the compiled plan's loops may write them
    # with streaming stores, timed against plain ones over their first runs (Program::stream_pick,
    # three of each kind; a row group streams its last member's); every run's values must be
    # torch's, and once timed the report says which stores its loops kept
    x = rand(shape, gen, dtype=dtype).requires_grad_()
    y = fn(x)
    go = rand(y.shape, gen, dtype=dtype)
    want = TORCH_GRAD(y, x, go, retain_graph=True)
    for _ in range(jit.AFTER + 2 * 3 + 1):
        got = fastgrad.grad(y, x, go, retain_graph=True)
        # (float32: sin' * exp + sin * exp' cancels where the two terms nearly oppose)
        torch.testing.assert_close(got[0], want[0],
                                   rtol=1e-4 if dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if dtype == torch.float32 else 1e-14)
    report = str(fastgrad.explain(y, x, go))
    assert "compiled loop (streaming stores for large outputs)" in report or \
        "compiled loop (plain stores for large outputs: streaming timed slower)" in report, report
    torch.testing.assert_close(fastgrad.grad(y, x, go, retain_graph=True)[0], got[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("shape,split", [((125000, 32), 1), ((700, 9), 1), ((3, 5, 7), 1),
                                         ((64, 3, 50), 2), ((40, 10000), 1), ((1, 300), 1)])
def test_column_sums(shape, split, dtype, compute):
    # Sums over the leading dims (a bias-like gradient): c = colsum(tanh(x * w) * g) and
    # d = colsum(x), beside an elementwise store e = x * g; w one row for all rows, g one value
    # per row. Against torch and the interpreter, on one and two threads.
    gen = torch.Generator().manual_seed(21)
    rows, cols = shape[:split], shape[split:]
    x = rand(shape, gen, dtype=dtype)
    w = rand((1,) * len(rows) + cols, gen, dtype=dtype)
    g = rand(rows + (1,) * len(cols), gen, dtype=dtype)
    c, d = (torch.empty((1,) * len(rows) + cols, dtype=dtype) for _ in range(2))
    e = torch.empty(shape, dtype=dtype)
    r = Region(shape)
    rx, rg = r.load(x), r.load(g)
    r.store(c, r.op("mul", r.op("tanh", r.op("mul", rx, r.load(w))), rg), mode=1)
    r.store(d, rx, mode=1)
    r.store(e, r.op("mul", rx, rg))
    desc, consts = r.pack()
    p = _C.Program(desc, consts, compute, [0, 1, 2], [0, 1, 2], 3, 3)
    assert p.column_sums(split)
    assert p.load_kinds(split) == ("crk" if math.prod(rows) > 1 else "csc")
    assert not any(p.column_sums(k) for k in range(len(shape)) if k != split)
    dims = tuple(range(split))
    xd, wd, gd = (t.double() for t in (x, w, g))
    refs = [(torch.tanh(xd * wd) * gd).sum(dims, keepdim=True), xd.sum(dims, keepdim=True),
            xd * gd]
    loose = 1e-10 if dtype == torch.float64 else 1e-4  # (sums of up to 125000 terms)
    plain, fast = _programs(r, compute, 3, 3, split)
    for nthreads in (1, 2):
        a, b = ([torch.full_like(o, float("nan")) for o in (c, d, e)] for _ in range(2))
        plain.run([x, g, w], a, nthreads)
        assert fast.run([x, g, w], b, nthreads) is True  # the loop ran
        for ref, ai, bi in zip(refs, a, b):
            torch.testing.assert_close(bi.double(), ref, rtol=loose, atol=loose)
            torch.testing.assert_close(bi, ai, rtol=loose, atol=loose)  # the interpreter's
        if nthreads == 1:
            first = [t.clone() for t in b]
        else:  # the same chunks whatever the thread count: the same sums, bit for bit
            assert all(torch.equal(u, v) for u, v in zip(first, b))


def test_column_sums_only_over_leading_dims():
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    r = Region(x.shape)
    r.store(torch.empty(6, 1, 4, dtype=torch.float64), r.load(x), mode=1)  # a middle dim
    desc, consts = r.pack()
    p = _C.Program(desc, consts, 1, [0], [0], 1, 1)
    assert not any(p.column_sums(k) or p.kernel_fits(k) for k in range(3))
    r = Region(x.shape)
    r.store(torch.empty(1, 5, 4, dtype=torch.float64), r.load(x), mode=2)  # a column max
    desc, consts = r.pack()
    p = _C.Program(desc, consts, 1, [0], [0], 1, 1)
    assert not any(p.column_sums(k) or p.kernel_fits(k) for k in range(3))


def _jit_exp_expected():
    """Whether the loops take jit_exp.h's float exp here: built by GCC with the flag the JIT
    adds for 512-bit loops (op_math.h's other conditions follow from those)."""
    return _C.build_info()["cxx_id"] == "GNU" and jit._JIT_EXP in jit._command("k", "o")


def _ulps(a, b):
    """|a - b| in float32 units in the last place (ordered as integers), NaN against NaN 0."""
    ia, ib = (t.view(torch.int32).long() for t in (a, b))
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    d = (ia - ib).abs()
    return torch.where(a.isnan() & b.isnan(), 0, d)


def test_compiled_float_exp():
    """On a GCC build for AVX-512 a loop's float exp is jit_exp.h's (not libmvec's): within 1 ulp
    of exp in double rounded to float over floats of every magnitude, the IEEE special values
    and both ends of the range, and bit for bit what the library's own fg_jit_exp16 gives (which
    libmvec's would not be: their results differ in about one value in six here)."""
    if not _jit_exp_expected():
        pytest.skip("jit_exp.h is for GCC builds for AVX-512 CPUs")
    gen = torch.Generator().manual_seed(31)
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 18,), generator=gen, dtype=torch.int64)
    dense = torch.empty(1 << 17).uniform_(-104.5, 89.5, generator=gen)  # where exp is finite
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 88.72283, 88.7229, 89.0,
                          -87.33655, -103.972, -103.28, -104.0, -104.5, 1e-30, -1e-30, 1e-45])
    x = torch.cat([edges, bits.to(torch.int32).view(torch.float32), dense])
    x = torch.cat([x, x[: (-len(x)) % 64]])  # whole vectors: every value through 16 lanes
    # (first 16k + 12 values: the loop's epilogue, through the 8-lane variant, then libm's expf;
    # then all: `r` and `got` below are that run's)
    for xs in (x[: len(x) - 52], x):
        r = Region(xs.shape)
        r.store(torch.empty_like(xs), r.op("exp", r.load(xs)))
        got = _run_both(r, 0, [xs], [xs])[1][0]
        want = torch.exp(xs.double()).float()
        # (a subnormal result may be 0: torch.compile in torch 2.5 leaves flush-to-zero set on
        # the thread that compiled, and then every exp of this thread flushes, libmvec's too)
        flushed = (want.abs() < torch.finfo(torch.float32).tiny) & (got == 0)
        assert (_ulps(got, want) <= 1).logical_or(flushed).all()
        assert torch.equal(got.isnan(), xs.isnan())
        torch.testing.assert_close(got[:5], torch.tensor([1.0, 1.0, math.inf, 0.0, math.nan]),
                                   rtol=0, atol=0, equal_nan=True)
    src = loop_source.source(_Spec(r), "c", 0, modes=[0])
    lib = jit.kernel_address(src, vector_only=False)[0]
    assert hasattr(lib, "fg_jit_exp16"), "the loop was built without jit_exp.h"
    own = torch.empty_like(x)
    p = ctypes.POINTER(ctypes.c_float)
    for i in range(0, len(x), 16):  # (the kernel itself, 16 values at a time)
        lib.fg_jit_exp16(ctypes.cast(x.data_ptr() + 4 * i, p),
                         ctypes.cast(own.data_ptr() + 4 * i, p))
    assert torch.equal(got.nan_to_num(), own.nan_to_num())


def test_overlapping_store_runs_the_interpreter():
    # A store one element ahead of its load in the same buffer: a loop reading element i
    # after writing element i - 1 would read a new value. The compiled loop is not used then.
    base = torch.randn(1001, dtype=torch.float64)
    r = Region((1000,))
    r.store(base[1:], r.op("exp", r.load(base[:-1])))
    plain, fast = _programs(r, 1, 1, 1)
    assert fast.run([base[:-1]], [base[1:]], 1) is False
    x, out = base[:-1].clone(), torch.empty(1000, dtype=torch.float64)
    assert fast.run([x], [out], 1) is True  # disjoint: the loop
    torch.testing.assert_close(out, torch.exp(x), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="already runs a compiled loop"):
        fast.set_kernel(1, None)  # once only (a run reads the loop, then its split)


def test_set_kernel_refuses_other_regions():
    x = torch.randn(8, 4, dtype=torch.float64)
    s = torch.empty(8, 1, dtype=torch.float64)
    r = Region(x.shape)
    r.store(s, r.load(x), mode=1)  # a row sum: over rows only
    desc, consts = r.pack()
    p = _C.Program(desc, consts, 1, [0], [0], 1, 1)
    assert [p.kernel_fits(k) for k in range(2)] == [False, True]
    with pytest.raises(ValueError, match="compiled loop"):
        p.set_kernel(1, None, 0)
    r = Region(x.shape)
    r.store(s, r.load(x), mode=2)  # a row max: its NaN and tie rules stay the interpreter's
    desc, consts = r.pack()
    assert not any(_C.Program(desc, consts, 1, [0], [0], 1, 1).kernel_fits(k) for k in range(2))
    r = Region((8, 5000))
    r.store(torch.empty(8, 1, dtype=torch.float64),
            r.load(torch.empty(8, 5000, dtype=torch.float64)), mode=1)  # rows over 4096
    desc, consts = r.pack()
    assert not any(_C.Program(desc, consts, 1, [0], [0], 1, 1).kernel_fits(k) for k in range(2))
    r = Region(x.shape)
    r.store(torch.empty_like(x), r.load(x.t().contiguous().t()))  # column-major load
    desc, consts = r.pack()
    assert not any(_C.Program(desc, consts, 1, [0], [0], 1, 1).kernel_fits(k) for k in range(2))


_COLUMN = torch.linspace(-1.5, 1.5, 40, dtype=torch.float64)[:, None]
CASES = [
    ("tanh_cube", lambda x: torch.tanh(x) ** 3, 1),
    ("softplus_sigmoid", lambda x: torch.nn.functional.softplus(x) * torch.sigmoid(x), 1),
    ("sin_exp_sum", lambda x: (torch.sin(x) * torch.exp(x)).sum(), 1),
    ("tanh_cube_2nd", lambda x: torch.tanh(x) ** 3, 2),
    ("logsumexp_rows", lambda x: torch.logsumexp(x.reshape(50, 100), 1), 1),  # rows: split 1
    ("softmax_rows", lambda x: torch.softmax(x.reshape(50, 100), 1), 1),  # a row group
    ("log_softmax_rows", lambda x: torch.log_softmax(x.reshape(20, 250), -1), 1),
    # x broadcast over 40 rows: its gradient is a column sum (split 1, column sums)
    ("column_sums", lambda x: torch.tanh(x[None, :] * _COLUMN), 1),
    # an `or` of two predicates feeding selects, which GCC once left scalar
    ("hardswish", lambda x: torch.nn.functional.hardswish(x * 3), 1),
    # sin and cos of one value in one loop, which GCC once fused into a scalar sincos call
    ("sin_2nd", lambda x: torch.sin(x) * x, 2),
    # Python numbers, saved by PyTorch as 0-d int64 / float64 tensors (loads of another dtype)
    ("python_numbers", lambda x: torch.sin(x) * 3 / 2 + torch.exp(x / 4), 1),
]


@pytest.mark.parametrize("name,fn,order", CASES, ids=[c[0] for c in CASES])
def test_plans_compile_after_some_runs(name, fn, order, gen):
    for k in range(jit.AFTER + 2):
        x = rand((5000,), gen).requires_grad_()
        y = fn(x)
        go = torch.ones_like(y) if y.dim() == 0 else rand(tuple(y.shape), gen)
        xr = x.detach().clone().requires_grad_()
        yr = fn(xr)
        if order == 1:
            got = fastgrad.grad(y, x, go, retain_graph=True)
            ref = TORCH_GRAD(yr, xr, go)
        else:
            g = fastgrad.grad(y, x, go, create_graph=True)[0]
            got = fastgrad.grad(g, x, go, retain_graph=True)
            gr = TORCH_GRAD(yr, xr, go, create_graph=True)[0]
            ref = TORCH_GRAD(gr, xr, go)
        assert_same(got, ref, rtol=1e-12, atol=1e-12)
    report = str(fastgrad.explain(y, x, go, create_graph=order == 2))
    assert "compiled loop" in report, report
    if name == "column_sums":  # (the column sum's own region, not only the one after it)
        assert [line for line in report.splitlines() if "reduce over dims [0]" in line and
                "compiled loop" in line], report


def test_a_failing_compiler_leaves_the_interpreter(monkeypatch, tmp_path, gen):
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_command", lambda src, out: ["/nonexistent/c++", src, "-o", out])
    monkeypatch.setattr(jit, "_LIBS", {})
    try:
        fn = lambda x: torch.cos(x) * torch.exp(x) * 3.0  # noqa: E731
        for _ in range(jit.AFTER + 1):
            x = rand((300,), gen).requires_grad_()
            go = rand((300,), gen)
            xr = x.detach().clone().requires_grad_()
            y = fn(x)
            assert_same(fastgrad.grad(y, x, go, retain_graph=True), TORCH_GRAD(fn(xr), xr, go),
                        rtol=1e-12, atol=1e-12)
        st = jit.status()
        assert not st["enabled"] and "nonexistent" in st["reason"]
        assert "compiled loop" not in str(fastgrad.explain(y, x, go))
    finally:
        jit.enable(True)


@pytest.mark.parametrize("avx512", [False, True])
def test_loops_take_the_vector_width_of_torchs_kernels(monkeypatch, avx512):
    # 512-bit vectors exactly where PyTorch's CPU kernels dispatch to AVX-512 (a native
    # build with GCC or Clang), and with them jit_exp.h's exp (whose variants compute 16
    # lanes: not for 256-bit loops); the flags are part of the command, so of the cache key
    monkeypatch.setattr(jit, "_torch_uses_avx512", lambda: avx512)
    info = _C.build_info()
    cmd = jit._command("k.cpp", "k.so")
    want = avx512 and info["native"] and info["cxx_id"] in ("GNU", "Clang", "AppleClang")
    assert ("-mprefer-vector-width=512" in cmd) == want
    assert (jit._JIT_EXP in cmd) == want
    assert cmd[-4:] == ["-o", "k.so", "k.cpp", "-lm"]


def test_a_failed_compile_keeps_the_compilers_error(monkeypatch, tmp_path):
    # A source whose compile fails is tried twice, then left to the interpreter; the JIT stays
    # on for other sources until _MAX_FAILED of them have failed. The compile command asks for
    # the vectorisation report, a line per loop before any error: the reason keeps the error,
    # not only the report's first lines.
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    runs = tmp_path / "runs"
    script = tmp_path / "cc.sh"
    script.write_text(f"echo run >> {runs}\n"
                      "for i in $(seq 40); do\n"
                      "  echo \"k.cpp:$i:5: optimized: loop vectorized using 32 byte vectors\" >&2\n"
                      "done\necho \"k.cpp:41:1: error: the real trouble\" >&2\nexit 1\n")
    monkeypatch.setattr(jit, "_command", lambda src, out: ["sh", str(script), src, out])
    monkeypatch.setattr(jit, "_LIBS", {})
    monkeypatch.setattr(jit, "_STATE", dict(jit._STATE, failed=0, last_failure=None))
    try:
        for k in range(jit._MAX_FAILED):
            assert jit.kernel_address(f"// loop {k}\n") is None
            st = jit.status()
            assert st["failed"] == k + 1 and len(runs.read_text().split()) == 2 * (k + 1)
            assert "error: the real trouble" in st["last_failure"], st["last_failure"]
            assert "optimized:" not in st["last_failure"]
            assert st["enabled"] == (k + 1 < jit._MAX_FAILED)
        assert f"{jit._MAX_FAILED} loops failed to compile" in st["reason"]
        assert "error: the real trouble" in st["reason"]
        assert jit.kernel_address("// loop 0\n") is None  # (not compiled again)
        assert len(runs.read_text().split()) == 2 * jit._MAX_FAILED
    finally:
        jit.enable(True)


def test_a_compile_that_fails_once_is_tried_again(monkeypatch, tmp_path):
    # (a compiler killed for memory, say): the second try's loop is used, nothing counted
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    real = jit._command
    marker = tmp_path / "failed-once"
    script = tmp_path / "cc.sh"
    script.write_text(f'if [ ! -e {marker} ]; then touch {marker}; echo "killed" >&2; exit 137; fi\n'
                      'exec "$@"\n')
    monkeypatch.setattr(jit, "_command", lambda src, out: ["sh", str(script), *real(src, out)])
    monkeypatch.setattr(jit, "_LIBS", {})
    monkeypatch.setattr(jit, "_STATE", dict(jit._STATE, failed=0, last_failure=None))
    gen = torch.Generator().manual_seed(26)
    x, y = rand((1000,), gen, dtype=torch.float32), rand((1000,), gen, dtype=torch.float32)
    r = Region((1000,))
    r.store(torch.empty(1000), r.op("mul", r.load(x), r.load(y)))
    p, _ = _timed_loop(r)
    assert marker.exists() and jit.status()["failed"] == 0 and jit.status()["enabled"]
    o = torch.full((1000,), float("nan"))
    assert p.run([x, y], [o], 1)
    assert torch.equal(o, x * y)


def test_a_compiler_refusing_jit_exp_compiles_the_loops_without_it(monkeypatch, tmp_path):
    # jit_exp.h defines functions under expf's vector-ABI names, which a compiler other than
    # the GCC 12 it was written with might refuse: loops then compile without it (libmvec's
    # exp), the JIT stays on and nothing counts as failed; later sources skip it at once
    monkeypatch.setattr(jit, "_torch_uses_avx512", lambda: True)
    if jit._JIT_EXP not in jit._command("k.cpp", "k.so"):
        pytest.skip("no jit_exp.h with this build (not native, or not GCC or Clang)")
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    real = jit._command
    runs = tmp_path / "runs"
    script = tmp_path / "cc.sh"
    script.write_text(f'echo "$*" >> {runs}\n'
                      f'case "$*" in *{jit._JIT_EXP}*) echo "error: refused" >&2; exit 1;; esac\n'
                      'exec "$@"\n')
    monkeypatch.setattr(jit, "_command", lambda src, out: ["sh", str(script), *real(src, out)])
    monkeypatch.setattr(jit, "_LIBS", {})
    monkeypatch.setattr(jit, "_STATE", dict(jit._STATE, failed=0, last_failure=None))
    gen = torch.Generator().manual_seed(27)
    for k, (n, op) in enumerate(((1000, "mul"), (1003, "div"))):  # (the second source is not
        # tried with it)
        x, y = rand((n,), gen, dtype=torch.float32), rand((n,), gen, dtype=torch.float32)
        r = Region((n,))
        r.store(torch.empty(n), r.op(op, r.op("exp", r.load(x)), r.load(y)))
        p, _ = _timed_loop(r)
        o = torch.full((n,), float("nan"))
        assert p.run([x, y], [o], 1)
        ref = getattr(torch, op)(torch.exp(x.double()), y.double())
        torch.testing.assert_close(o, ref.float(), rtol=5e-7, atol=0)
        cmds = runs.read_text().splitlines()
        assert [jit._JIT_EXP in c for c in cmds] == [True, True, False] + [False] * k
    st = jit.status()
    assert st["enabled"] and st["failed"] == 0
    assert "compile with csrc/jit_exp.h" in st["jit_exp_off"] and "error: refused" in st["jit_exp_off"]
    assert jit._JIT_EXP not in jit._command("k.cpp", "k.so")


def _compiled_programs(shape):
    return [pk.program.compiled for pl in list(fplan._CACHE.values()) for r in pl.regions
            if tuple(r.shape) == shape for pk in r.packers.values() if pk.program is not None]


def test_compiles_after_the_run_that_reaches_after(monkeypatch, gen):
    # jit.AFTER = 1: compiled after the first run; a layout first met later (a grad_output
    # expanded along the rows: a new Program) is compiled after its own first run.
    monkeypatch.setattr(jit, "AFTER", 1)
    shape = (37, 41)
    fn = lambda x: torch.sin(x) * torch.tanh(x)  # noqa: E731
    x = rand(shape, gen).requires_grad_()
    fastgrad.grad(fn(x), x, rand(shape, gen))
    assert _compiled_programs(shape) == [True]
    x = rand(shape, gen).requires_grad_()
    go = rand(shape[1:], gen).expand(shape)
    got = fastgrad.grad(fn(x), x, go)
    assert _compiled_programs(shape) == [True, True]
    xr = x.detach().clone().requires_grad_()
    assert_same(got, TORCH_GRAD(fn(xr), xr, go), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("create_graph", [False, True])
def test_plans_are_offered_to_the_compiler_once_per_new_layout(monkeypatch, gen, create_graph):
    """A plan is offered to jit.compile_plan on the run that reaches jit.AFTER and after a run
    that made a Program for a new layout, not on every run (create_graph runs never take the
    C++ Executor, and offering them each time cost more than the region on small graphs)."""
    offered = []
    real = jit.compile_plan
    monkeypatch.setattr(jit, "compile_plan", lambda p: (offered.append(p), real(p)))
    shape = (29, 31 + create_graph)  # (a plan of its own: plans outlive a test)
    fn = lambda x: torch.sin(x) * torch.tanh(x)  # noqa: E731
    x = rand(shape, gen).requires_grad_()
    y = fn(x)
    for call in range(jit.AFTER + 3):
        go = rand(shape, gen)
        if call == jit.AFTER + 1:  # a new layout of the grad_output: a new Program
            go = rand(shape[1:], gen).expand(shape)
        got = fastgrad.grad(y, x, go, retain_graph=True, create_graph=create_graph)
        assert_same(got, TORCH_GRAD(y, x, go, retain_graph=True), rtol=1e-12, atol=1e-12)
        assert len(offered) == (0 if call + 1 < jit.AFTER else 1 if call <= jit.AFTER else 2)


def test_missing_headers_turn_the_jit_off(monkeypatch, tmp_path, gen):
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_include_dir", lambda: str(tmp_path / "no-include"))
    monkeypatch.setattr(jit, "_STATE", dict(jit._STATE))
    monkeypatch.setattr(jit, "_LIBS", {})
    jit._STATE.pop("headers", None)
    fn = lambda x: torch.exp(x) * torch.cos(x) - 1.5  # noqa: E731
    for _ in range(jit.AFTER + 1):  # no error escapes on the call that compiles
        x = rand((211,), gen).requires_grad_()
        go = rand((211,), gen)
        xr = x.detach().clone().requires_grad_()
        assert_same(fastgrad.grad(fn(x), x, go), TORCH_GRAD(fn(xr), xr, go), rtol=1e-12,
                    atol=1e-12)
    st = jit.status()
    assert not st["enabled"] and "op_math.h" in st["reason"]
    assert _compiled_programs((211,)) == [False]


def test_prune_cache_drops_least_recently_used_entries_whole(tmp_path):
    # Entries fg_0..fg_5 (a loop: 1000 bytes, with empty "left scalar" and "streaming variant
    # left scalar" markers when k is even) and fg_cuda_1/3/5 (CUDA kernels, 1000 bytes), last
    # used at times 1000 + k; fg_0 is then used now. 9000 bytes in all; files not named fg_* are
    # not the cache's.
    def entry(name, size, when):
        (tmp_path / name).write_bytes(b"x" * size)
        os.utime(tmp_path / name, (when, when))

    for k in range(6):
        entry(f"fg_{k}.so", 1000, 1000 + k)
        if k % 2:
            entry(f"fg_cuda_{k}.cubin", 1000, 1000 + k)
        else:
            entry(f"fg_{k}.scalar", 0, 1000 + k)
            entry(f"fg_{k}.nostream", 0, 1000 + k)
    entry("notes.txt", 50_000, 1)
    jit_cache._cache_used(str(tmp_path / "fg_0.so"))
    assert jit_cache.prune_cache(str(tmp_path), limit=9000) == 0
    # over 6000 bytes: the oldest entries go until 4500 are left
    assert jit_cache.prune_cache(str(tmp_path), limit=6000) == 5
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["fg_0.nostream", "fg_0.scalar", "fg_0.so", "fg_4.nostream", "fg_4.scalar",
                    "fg_4.so", "fg_5.so", "fg_cuda_5.cubin", "notes.txt"]


def test_the_first_compiles_of_a_process_side_by_side(monkeypatch, tmp_path):
    # The cache key's facts (headers, CPU) are read once, by the first of compile_all's threads;
    # the others must wait for both (a softmax's two regions as a process's first compile).
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_STATE", {k: v for k, v in jit._STATE.items()
                                        if k not in ("headers", "cpu")})
    slow = jit._cpu_identity

    def cpu_identity():
        time.sleep(0.2)
        return slow()

    monkeypatch.setattr(jit, "_cpu_identity", cpu_identity)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    srcs = [f'extern "C" void fg_kernel(char* const* p, long b, long e) {{ (void)p; (void)b; '
            f'(void)e; /* {k} */ }}\n' for k in range(4)]
    got = jit.compile_all(srcs)
    assert len(got) == 4 and len({jit._key(s) for s in srcs}) == 4, jit.status()


def test_loops_already_compiled_are_set_without_a_pool(monkeypatch, tmp_path):
    # A plan whose loops are loaded (or in the disk cache) sets them on the calling thread:
    # starting compile_all's pool for them cost about 3 ms a plan, paid by the third run of
    # each plan of a graph whose shapes cycle (the benchmark's pinn_resample). Sources that
    # need the compiler still compile side by side.
    monkeypatch.setenv("FASTGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    srcs = [f'extern "C" void fg_kernel(char* const* p, long b, long e) {{ (void)p; (void)b; '
            f'(void)e; /* pool {k} */ }}\n' for k in range(4)]
    first = jit.compile_all(srcs[:2])
    assert all(first), jit.status()
    seen = {}

    def address(src):
        seen[src] = threading.get_ident()
        return jit.kernel_address(src)

    got = jit.compile_all(srcs, address)
    main = threading.get_ident()
    assert got[:2] == first and all(got), jit.status()
    assert [seen[s] == main for s in srcs] == [True, True, False, False]
