"""Row groups: consecutive regions run chunk of rows by chunk of rows (plan_steps.RowGroup,
_C.run_cpu_group, csrc/vm_cpu_group.h), and the interpreter's direct reads that serve them
(a broadcast row value read once per run, a sum of products without the products).

End to end: fastgrad.grad against torch.autograd.grad on reduce-then-broadcast graphs, with
``explain`` showing that the group ran chunk by chunk. At the VM: hand-packed groups against
torch, results that do not depend on the thread count, the fallbacks, and argument errors.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fastgrad
from conftest import check_grad, leaf, rand, strided_leaf
from test_vm import C, F32, F64, MAX, SUM, Region

# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def _layer_norm(x):
    m = x.mean(-1, keepdim=True)
    d = x - m
    v = (d * d).mean(-1, keepdim=True)
    return d / torch.sqrt(v + 1e-5)


def _softmax_chain(x):
    return torch.softmax(x * 1.5, -1) * x


CASES = {
    "softmax": lambda x: torch.softmax(x, -1),
    "log_softmax": lambda x: torch.log_softmax(x, -1),
    "amax": lambda x: x.amax(-1),
    "layer_norm": _layer_norm,
    "softmax_chain": _softmax_chain,
}
# (shape, how the group runs: in chunks, as one call without chunks, not grouped at all)
SHAPES = [
    ((3001, 256), "chunks"),   # rows not a multiple of the chunk
    ((20011, 3), "chunks"),    # many tiny rows
    ((7, 130, 64), "chunks"),  # rows over two leading dims
    ((2, 3, 5), "one call"),   # fits in cache: one region after another, in one call
    ((1, 300), "none"),        # one row: nothing to interleave
]
_GROUP_LINE = re.compile(r"row group over dims \[[0-9, ]+\] of the (\d+) regions below: (\d+) chunks")


def _group_chunks(report):
    """(regions, chunks) of each row group the report shows as run in chunks."""
    return [tuple(map(int, m.groups())) for m in map(_GROUP_LINE.match, report.regions) if m]


def _tol(dtype):
    return {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5, atol_scale=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,how", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch(name, shape, how, dtype, gen):
    check_grad(CASES[name], [rand(shape, gen, dtype=dtype)], gen=gen, native=True, **_tol(dtype))


@pytest.mark.parametrize("name", list(CASES))
def test_non_contiguous_input(name, gen):
    # x is a transposed view: its rows are strided in memory
    check_grad(CASES[name], [rand((2049, 96), gen)], gen=gen, leaf_fn=strided_leaf)


@pytest.mark.parametrize("name", list(CASES))
def test_non_contiguous_grad_output(name, gen):
    x = leaf(rand((1500, 200), gen))
    y = CASES[name](x)
    go = rand(tuple(y.shape)[::-1], gen).t() if y.dim() == 2 else rand(y.shape, gen)
    ref = torch.autograd.grad(y, x, go, retain_graph=True)
    got = fastgrad.grad(y, x, go, retain_graph=True)
    torch.testing.assert_close(got[0], ref[0])


@pytest.mark.parametrize("shape,how", SHAPES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "amax", "layer_norm"])
def test_group_runs_in_chunks(name, shape, how, gen):
    x = leaf(rand(shape, gen))
    y = CASES[name](x)
    report = fastgrad.explain(y, x, rand(y.shape, gen))
    groups = [line for line in report.regions if line.startswith("row group")]
    runs = _group_chunks(report)
    if how == "none":
        assert not groups and report.kernel_launches >= 2, str(report)
        return
    assert len(groups) == 1 and report.kernel_launches == 1, str(report)
    if how == "chunks":
        assert len(runs) == 1 and runs[0][0] >= 2 and runs[0][1] > 1, str(report)
    else:
        assert not runs, str(report)


def test_layer_norm_is_one_group_of_three(gen):
    x = leaf(rand((3000, 128), gen))
    report = fastgrad.explain(_layer_norm(x), x, rand((3000, 128), gen))
    assert [n for n, _ in _group_chunks(report)] == [3], str(report)


@pytest.mark.parametrize("fn,shape", [
    (lambda x: torch.softmax(x, 0), (512, 300)),       # reduces the leading dim
    (lambda x: torch.softmax(x.t(), -1), (300, 512)),  # reads the row sums transposed
    (lambda x: torch.logsumexp(x, -1), (3000, 256)),   # one pass: nothing to group
])
def test_not_grouped(fn, shape, gen):
    x = leaf(rand(shape, gen))
    y = fn(x)
    report = fastgrad.explain(y, x, rand(y.shape, gen))
    assert not any(line.startswith("row group") for line in report.regions), str(report)
    check_grad(fn, [rand(shape, gen)], gen=gen)


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["softmax", "layer_norm"])
def test_results_do_not_depend_on_thread_count(name, gen, threads):
    x = leaf(rand((4001, 256), gen, dtype=torch.float32))
    y = CASES[name](x)
    go = rand(y.shape, gen, dtype=torch.float32)
    got = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        got.append(fastgrad.grad(y, x, go, retain_graph=True)[0])
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "layer_norm"])
def test_create_graph(name, gen):
    # The plan then runs as one block (blocks.PlanBlock): its plain run inside one
    # RegionFunction, the row group chunked as without create_graph.
    check_grad(CASES[name], [rand((2500, 128), gen)], orders=2, gen=gen)


# ---------------------------------------------------------------------------------------------
# the VM: hand-packed groups (test_vm's packer)
# ---------------------------------------------------------------------------------------------


def _softmax_group(y, g, compute):
    """Region A: s = sum(g*y) over the last dim; region B: out = y * (g - s)."""
    shape = list(y.shape)
    s = torch.empty(shape[:-1] + [1], dtype=y.dtype)
    out = torch.empty_like(y)
    a = Region(shape)
    a.store(s, a.op("mul", a.load(g), a.load(y)), mode=SUM)
    b = Region(shape)
    yb, gb = b.load(y), b.load(g)
    b.store(out, b.op("mul", yb, b.op("sub", gb, b.load(s))))
    return [a, b], s, out


def _run_group(regions, compute, mask=1, nthreads=1):
    packed = [r.pack() for r in regions]
    return C.run_cpu_group([d for d, _ in packed], [c for _, c in packed], [compute] * len(regions),
                           mask, nthreads)


def _softmax_ref(y, g):
    yd, gd = y.double(), g.double()
    return yd * (gd - (gd * yd).sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype,compute", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("shape,chunked", [((4099, 256), True), ((30000, 7), True),
                                           ((3, 70000), False),  # rows too long to stay in cache
                                           ((1, 2000), False), ((5, 3), False)])
def test_vm_group_softmax_backward(shape, chunked, dtype, compute):
    gen = torch.Generator().manual_seed(21)
    y = torch.randn(shape, dtype=dtype, generator=gen)
    g = torch.randn(shape, dtype=dtype, generator=gen)
    ref = _softmax_ref(y, g)
    results = []
    for nthreads in (1, 2, 3):
        regions, s, out = _softmax_group(y, g, compute)
        chunks = _run_group(regions, compute, 1, nthreads)
        assert (chunks > 1) == chunked
        torch.testing.assert_close(out.double(), ref, rtol=1e-4 if compute == F32 else 1e-10,
                                   atol=1e-4 if compute == F32 else 1e-10)
        results.append(out)
    if chunked:  # each row reduced by one thread, in one order
        assert all(torch.equal(out, results[0]) for out in results[1:])


@pytest.mark.parametrize("min_bytes", [-1, 1024])
def test_vm_group_spans_cover_every_row_whatever_the_threads(min_bytes):
    # 1000 rows of 256 floats pass from the caches: each thread walks one fixed span of rows
    # (region_extents.h, fixed_ranges); with the threshold at 1 KiB they pass from memory and
    # threads take spans in turn. Either way every row is computed once, the same.
    gen = torch.Generator().manual_seed(23)
    y, g = torch.randn(1000, 256, generator=gen), torch.randn(1000, 256, generator=gen)
    C.set_stream_min_bytes(min_bytes)
    try:
        results = []
        for nthreads in (1, 2, 3):
            regions, s, out = _softmax_group(y, g, F32)
            out.fill_(float("nan"))
            assert _run_group(regions, F32, 1, nthreads) > 1
            torch.testing.assert_close(out.double(), _softmax_ref(y, g), rtol=1e-4, atol=1e-4)
            results.append(out)
    finally:
        C.set_stream_min_bytes(-1)
    assert all(torch.equal(out, results[0]) for out in results[1:])


def test_vm_group_with_fewer_threads_than_asked():
    # OpenMP may give fewer threads than asked (OMP_THREAD_LIMIT, a parallel region around the
    # call): the fixed spans of the threads it did not give are computed all the same.
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from test_row_groups import F32, _run_group, _softmax_group, _softmax_ref
        gen = torch.Generator().manual_seed(24)
        y, g = torch.randn(1000, 256, generator=gen), torch.randn(1000, 256, generator=gen)
        regions, s, out = _softmax_group(y, g, F32)
        out.fill_(float("nan"))
        assert _run_group(regions, F32, 1, 3) > 1
        torch.testing.assert_close(out.double(), _softmax_ref(y, g), rtol=1e-4, atol=1e-4)
    """)
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_vm_group_streams_a_large_output():
    # An output of more than 8 MB that no later region reads is written with streaming stores.
    gen = torch.Generator().manual_seed(22)
    y = torch.randn(8300, 256, generator=gen)
    g = torch.randn(8300, 256, generator=gen)
    regions, s, out = _softmax_group(y, g, F32)
    assert _run_group(regions, F32, 1, 2) > 1
    ref = _softmax_ref(y, g)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_vm_group_three_regions_max_then_two_broadcasts():
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(3001, 257, dtype=torch.float64, generator=gen)
    m = torch.empty(3001, 1, dtype=torch.float64)
    z = torch.empty(3001, 1, dtype=torch.float64)
    out = torch.empty_like(x)
    a = Region(x.shape)
    a.store(m, a.load(x), mode=MAX)
    b = Region(x.shape)  # z = sum(exp(x - m))
    b.store(z, b.op("exp", b.op("sub", b.load(x), b.load(m))), mode=SUM)
    c = Region(x.shape)  # out = exp(x - m) / z, the broadcast operand first and second
    c.store(out, c.op("div", c.op("exp", c.op("sub", c.load(x), c.load(m))), c.load(z)))
    assert _run_group([a, b, c], F64, 1, 2) > 1
    torch.testing.assert_close(out, torch.softmax(x, -1), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", ["no mask", "leading dim reduced", "sizes differ", "column sum"])
def test_vm_group_runs_one_after_another_when_it_cannot_chunk(case):
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2000, 300, dtype=torch.float64, generator=gen)
    mask = 0 if case == "no mask" else 1
    if case == "leading dim reduced":
        s = torch.empty(1, 300, dtype=torch.float64)
        ref_s = x.sum(0, keepdim=True)
    elif case == "column sum":  # reduces dim 1 of (2000, 300, 1)... kept innermost: outer strategy
        x = x.view(2000, 3, 100)
        s = torch.empty(2000, 1, 100, dtype=torch.float64)
        ref_s = x.sum(1, keepdim=True)
    else:
        s = torch.empty(2000, 1, dtype=torch.float64)
        ref_s = x.sum(1, keepdim=True)
    a = Region(x.shape)
    a.store(s, a.load(x), mode=SUM)
    if case == "sizes differ":
        y = torch.randn(1000, 300, dtype=torch.float64, generator=gen)
        out = torch.empty_like(y)
        b = Region(y.shape)
        b.store(out, b.op("neg", b.load(y)))
        ref_out = -y
    else:
        out = torch.empty_like(x)
        b = Region(x.shape)
        b.store(out, b.op("mul", b.load(x), b.load(s)))
        ref_out = x * ref_s
    assert _run_group([a, b], F64, mask, 2) == 0
    torch.testing.assert_close(s, ref_s)
    torch.testing.assert_close(out, ref_out)


def test_vm_group_arguments():
    x = torch.ones(4, 4, dtype=torch.float64)
    s = torch.empty(4, 1, dtype=torch.float64)
    r = Region(x.shape)
    r.store(s, r.load(x), mode=SUM)
    d, c = r.pack()
    assert C.run_cpu_group([], [], [], 1, 1) == 0
    with pytest.raises(ValueError, match="same length"):
        C.run_cpu_group([d], [], [F64], 1, 1)
    with pytest.raises(ValueError, match="chunk_mask"):
        C.run_cpu_group([d], [c], [F64], 1 << 20, 1)
    with pytest.raises(ValueError, match="nthreads"):
        C.run_cpu_group([d], [c], [F64], 1, 0)
    with pytest.raises(ValueError, match="compute_dtype"):
        C.run_cpu_group([d], [c], [7], 1, 1)
    bad = type(d)("q", list(d)[:-1])
    with pytest.raises(ValueError, match="region descriptor"):
        C.run_cpu_group([d, bad], [c, c], [F64, F64], 1, 1)


# ---------------------------------------------------------------------------------------------
# the VM: direct reads (plan_direct_reads) give the values of the plain program
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,compute", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("cols", [1, 5, 15, 16, 17, 40, 256, 1001])
def test_sum_of_products_is_the_sum_of_the_rounded_products(cols, dtype, compute):
    gen = torch.Generator().manual_seed(25)
    x = torch.randn(300, cols, dtype=dtype, generator=gen) * 1e3
    y = torch.randn(300, cols, dtype=dtype, generator=gen)
    x.view(-1)[7] = float("inf")
    y.view(-1)[cols * 5 + cols // 2] = float("nan")
    fused, plain, prod = (torch.empty(300, 1, dtype=dtype) for _ in range(3))
    r = Region(x.shape)  # the product is read only by the sum: not written anywhere
    r.store(fused, r.op("mul", r.load(x), r.load(y)), mode=SUM)
    r.run(compute, 2)
    p = torch.empty_like(x)
    r = Region(x.shape)  # the product is also stored: computed as usual
    v = r.op("mul", r.load(x), r.load(y))
    r.store(p, v)
    r.store(plain, v, mode=SUM)
    r.run(compute, 2)
    assert torch.equal(fused.isnan(), plain.isnan())
    assert torch.equal(fused.nan_to_num(), plain.nan_to_num())
    torch.testing.assert_close(plain, (x.double() * y.double()).sum(1, keepdim=True).to(dtype),
                               equal_nan=True, rtol=1e-5 if compute == F32 else 1e-12, atol=1e-3)


@pytest.mark.parametrize("dtype,compute", [(torch.float64, F64), (torch.float32, F32)])
def test_broadcast_operand_read_per_run(dtype, compute):
    gen = torch.Generator().manual_seed(26)
    x = torch.randn(70, 33, dtype=dtype, generator=gen)
    col = torch.randn(70, 1, dtype=dtype, generator=gen)
    row = torch.randn(1, 33, dtype=dtype, generator=gen)
    outs = [torch.empty_like(x) for _ in range(4)]
    r = Region(x.shape)
    lx, lc = r.load(x), r.load(col)
    r.store(outs[0], r.op("sub", lc, lx))                     # broadcast operand a
    r.store(outs[1], r.op("div", lx, lc))                     # broadcast operand b
    r.store(outs[2], r.op("add", r.op("mul", lx, lc), r.load(row)))  # row: not along the innermost dim
    lc2 = r.load(col)
    r.store(outs[3], r.op("mul", r.op("exp", lc2), lc2))      # also read by a unary op: filled
    for nthreads in (1, 2):
        r.run(compute, nthreads)
        torch.testing.assert_close(outs[0], col - x)
        torch.testing.assert_close(outs[1], x / col)
        torch.testing.assert_close(outs[2], x * col + row)
        torch.testing.assert_close(outs[3], (col.exp() * col).expand_as(x))
