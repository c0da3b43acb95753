"""The CPU evaluator's fast paths (csrc/vm_cpu*.h) against torch and against the same math
reached through its slow paths. The descriptors are packed with tests/test_vm.py's packer."""
import math

import pytest
import torch

from test_vm import COMPUTE, F32, F64, MAX, MIN, OP, SUM, Region, _reduce_ref, check  # noqa: F401


# ---- fast paths of the evaluator ----------------------------------------------
# Contiguous loads of the compute dtype are read in place, results that are
# stored contiguously are computed straight into the output, short innermost
# dims are walked as 2-D tiles, and predicates are evaluated per tile. These
# tests compare such regions with torch (and with the same math reached
# through the slow paths: strided, other dtype, overlapping outputs).

BIG = [1, 15, 256, 4097, 70_001]  # around block sizes and kParallelMin


@pytest.mark.parametrize("n", BIG)
@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_contiguous_strided_and_converted_agree(n, dtype, compute, nthreads):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)   # exact in both float dtypes
    buf = torch.full((2 * n,), math.nan, dtype=dtype)
    buf[::2] = x
    xs = buf[::2]                                # strided view, same values
    other = torch.float64 if dtype == torch.float32 else torch.float32
    cdt = torch.float32 if compute == F32 else torch.float64

    def run(src, out):
        r = Region([n])
        l = r.load(src)
        e, c_, s = r.op("exp", l), r.op("cos", l), r.op("sin", l)
        r.store(out, r.op("add", r.op("mul", c_, e), r.op("mul", s, e)))
        r.run(compute, nthreads)
        return out

    ground = run(x, torch.empty(n, dtype=cdt))   # values of the compute type
    for src in [x, xs, x.to(other)]:
        for out in [torch.empty(n, dtype=dtype), torch.empty(2 * n, dtype=dtype)[1::2],
                    torch.empty(n, dtype=other)]:
            assert torch.equal(run(src, out), ground.to(out.dtype))
    x64 = x.double()
    scale = x64.exp() * (x64.cos().abs() + x64.sin().abs())
    err = (ground.double() - (x64.cos() * x64.exp() + x64.sin() * x64.exp())).abs()
    assert (err <= (4e-6 if compute == F32 else 1e-14) * scale).all()


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("compute", [F32, F64])
def test_register_reuse_stores_and_loads_to_stores(nthreads, compute):
    dtype = torch.float32 if compute == F32 else torch.float64
    n = 70_001
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, dtype=dtype, generator=g)
    y = torch.randn(n, dtype=dtype, generator=g)
    outs = [torch.empty(n, dtype=dtype) for _ in range(6)]
    r = Region([n])
    a = r.load(x)
    r.store(outs[0], a)                       # a load stored as is
    b = r.op("exp", a)
    r.store(outs[1], b)                       # same value, two stores
    r.store(outs[2], b)
    r.instrs.append((OP["neg"], b, b, 0, 0))  # overwrite b in place after its stores
    r.store(outs[3], r.op("add", b, r.load(y)))
    r.store(outs[4], r.const(2.5))
    r.store(outs[5], r.op("mul", r.iota(0, 0.5, 1.0), a))
    r.run(compute, nthreads)
    check(outs[0], x)
    check(outs[1], x.exp())
    check(outs[2], x.exp())
    assert torch.equal(outs[3], -outs[1] + y)  # b was overwritten by -b before this store
    assert torch.equal(outs[4], torch.full((n,), 2.5, dtype=dtype))
    check(outs[5], (torch.arange(n, dtype=torch.float64) * 0.5 + 1.0).to(dtype) * x)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_output_overlapping_input(nthreads):
    """In place (the output is the input) still computes f(x) elementwise."""
    n = 70_001
    g = torch.Generator().manual_seed(12)
    x = torch.randn(n, generator=g)
    ref = torch.sin(x) * 2 + x
    r = Region([n])
    l = r.load(x)
    r.store(x, r.op("add", r.op("mul", r.op("sin", l), r.const(2.0)), l))
    r.run(F32, nthreads)
    check(x, ref)


def _pred_reference(src, shape, strides, offset, preds):
    """The load of vm.h's contract, evaluated with torch over the whole space."""
    coords = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    off = torch.full(shape, offset, dtype=torch.int64)
    for d, st in enumerate(strides):
        off = off + coords[d] * st
    valid = torch.ones(shape, dtype=torch.bool)
    for dim, mul, add, div, ln, st in preds:
        t = mul * coords[dim] + add
        q = torch.div(t, div, rounding_mode="floor")
        valid &= (t >= 0) & (t % div == 0) & (q < ln)
        off = off + q * st
    flat = src.flatten()
    vals = flat[torch.where(valid, off, torch.zeros_like(off)).clamp(0, max(flat.numel() - 1, 0))]
    return torch.where(valid, vals, torch.zeros_like(vals))


PRED_CASES = [
    # shape, strides over a flat source, offset, predicates (dim, mul, add, div, len, stride)
    ((1000, 4), [1, 0], 0, [(1, 1, 0, 1, 1, 0)]),                  # x[:, 0]'s VJP
    ((1000, 4), [1, 0], 0, [(1, 1, -1, 1, 1, 0)]),                 # x[:, 1]
    ((3001, 7), [3, 0], 0, [(1, 1, -1, 2, 3, 1)]),                 # x[:, 1::2]
    ((3001, 7), [0, 0], 3000, [(0, -1, 3000, 1, 3001, 1), (1, -1, 5, 1, 4, 3001)]),  # flipped window
    ((500, 9), [0, 0], 0, [(1, 2, -3, 3, 4, 1), (0, 1, -100, 1, 300, 5)]),  # mul 2, div 3; rows window
    ((500, 40), [0, 1], 0, [(0, 1, -7, 3, 100, 40)]),               # predicate on the row dim only
    ((20, 30, 6), [0, 6, 0], 0, [(0, 1, -4, 1, 10, 180), (2, 1, -2, 1, 3, 1)]),
    ((20, 30, 6), [180, 0, 1], 0, [(1, 3, 0, 2, 40, 6)]),
    ((2000, 5), [1, 0], 0, [(1, 1, 0, 1, 5, 0), (1, 1, -1, 1, 5, 0)]),  # two predicates on the inner dim
    ((4000, 3), [3, 1], 0, [(1, 0, 0, 1, 1, 0)]),                   # mul 0: constant
    ((70_001,), [0], 0, [(0, 1, -100, 7, 9000, 1)]),                # 1-D, long
    ((1000, 4), [1, 0], 0, [(1, 1, -(1 << 62), 1, 1 << 62, 0)]),    # extreme values: nothing valid
    ((1000, 4), [1, 0], 0, [(1, -1, 1 << 62, 1 << 40, 5, 0)]),
    ((1000, 4), [1, 0], 0, [(1, 1 << 40, 0, 1 << 41, 3, 1)]),       # every other column
]


@pytest.mark.parametrize("case", range(len(PRED_CASES)))
@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_predicated_tiles(case, nthreads, dtype, compute):
    shape, strides, offset, preds = PRED_CASES[case]
    g = torch.Generator().manual_seed(case)
    ref_src = torch.randn(200_000, dtype=dtype, generator=g)
    ref = _pred_reference(ref_src, shape, strides, offset, preds)
    for out in [torch.full(shape, math.nan, dtype=dtype),
                torch.full(tuple(reversed(shape)), math.nan, dtype=dtype).permute(*reversed(range(len(shape))))]:
        r = Region(shape)
        r.store(out, r.load(ref_src, strides=strides, offset=offset, preds=preds))
        r.run(compute, nthreads)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 17])
def test_narrow_reductions_and_broadcasts(k, nthreads):
    """Many short rows: (N, k) row sums, column sums and expands of an (N, 1) column."""
    g = torch.Generator().manual_seed(k)
    n = 40_000 + 3
    x = torch.randn(n, k, dtype=torch.float64, generator=g)
    col = torch.randn(n, 1, dtype=torch.float64, generator=g)
    for mode in [SUM, MAX, MIN]:
        for dims in [(1,), (0,)]:
            ref = _reduce_ref(x, mode, dims)
            out = torch.empty(ref.shape, dtype=torch.float64)
            r = Region([n, k])
            r.store(out, r.load(x), mode=mode)
            r.run(F64, nthreads)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-9)
    out = torch.empty(n, k, dtype=torch.float32)
    r = Region([n, k])
    r.store(out, r.op("mul", r.load(col), r.load(x)))
    r.run(F32, nthreads)
    check(out, (col * x).float())
    out_t = torch.empty(k, n, dtype=torch.float64)       # transposed store of a broadcast
    r = Region([n, k])
    r.store(out_t.t(), r.load(col))
    r.run(F64, nthreads)
    assert torch.equal(out_t.t(), col.expand(n, k))


def test_more_than_2_31_elements():
    """64-bit indexing on the CPU: an iteration space of 2^31+5 elements (a stride-0 input, so
    no memory): a full sum, and iota max/min whose coordinates pass 2^31."""
    n = (1 << 31) + 5
    one = torch.ones(1, dtype=torch.float32).expand(n)
    s, mx, mn = (torch.empty((), dtype=torch.float64) for _ in range(3))
    r = Region([n])
    r.store(s, r.load(one, strides=[0]), mode=SUM)
    io = r.iota(0, 1.0, 0.0)
    r.store(mx, io, mode=MAX)
    r.store(mn, io, mode=MIN)
    r.run(F64, 2)
    assert s.item() == float(n)
    assert mx.item() == float(n - 1) and mn.item() == 0.0
