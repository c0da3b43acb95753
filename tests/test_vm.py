"""Tests of the compiled evaluator fastgrad._C.run_cpu against torch.

Descriptors are packed by hand here (a tiny packer, independent of the
package's own planner) with torch tensors as storage, so these tests pin down
the descriptor contract documented in csrc/vm.h.
"""
import array
import math

import pytest
import torch

C = pytest.importorskip("fastgrad._C")
OP = C.opcodes()
DT = C.dtypes()
ASSIGN, SUM, MAX, MIN = 0, 1, 2, 3
F32, F64 = 0, 1
TORCH_DT = {torch.float32: DT["float32"], torch.float64: DT["float64"], torch.float16: DT["float16"],
            torch.bfloat16: DT["bfloat16"], torch.int64: DT["int64"], torch.bool: DT["bool"],
            torch.int32: DT["int32"]}


def bstrides(t, shape):
    """Strides of t broadcast (right-aligned) against the iteration shape."""
    nd, k = len(shape), t.dim()
    assert k <= nd
    out = [0] * nd
    for i in range(k):
        d = nd - k + i
        if t.shape[i] != 1:
            assert t.shape[i] == shape[d], (t.shape, shape)
            out[d] = t.stride(i)
    return out


class Region:
    def __init__(self, shape):
        self.shape = list(shape)
        self.loads, self.stores, self.instrs, self.consts = [], [], [], []
        self.nregs = 0

    def _reg(self):
        self.nregs += 1
        return self.nregs - 1

    def load(self, t, strides=None, offset=0, preds=()):
        strides = bstrides(t, self.shape) if strides is None else list(strides)
        rec = [t.data_ptr(), TORCH_DT[t.dtype], offset, *strides, len(preds)]
        for p in preds:
            rec += list(p)  # (dim, mul, add, div, len, stride)
        self.loads.append(rec)
        r = self._reg()
        self.instrs.append((OP["load"], r, len(self.loads) - 1, 0, 0))
        return r

    def const(self, v):
        self.consts.append(float(v))
        r = self._reg()
        self.instrs.append((OP["const"], r, len(self.consts) - 1, 0, 0))
        return r

    def iota(self, dim, scale, shift):
        self.consts += [float(scale), float(shift)]
        r = self._reg()
        self.instrs.append((OP["iota"], r, dim, len(self.consts) - 2, len(self.consts) - 1))
        return r

    def op(self, name, *args):
        r = self._reg()
        a = list(args) + [0] * (3 - len(args))
        self.instrs.append((OP[name], r, *a))
        return r

    def store(self, t, reg, mode=ASSIGN, strides=None):
        strides = bstrides(t, self.shape) if strides is None else list(strides)
        self.stores.append([t.data_ptr(), TORCH_DT[t.dtype], mode, *strides])
        self.instrs.append((OP["store"], 0, len(self.stores) - 1, reg, 0))

    def pack(self):
        d = [len(self.shape), len(self.loads), len(self.stores), len(self.instrs), self.nregs, *self.shape]
        for rec in self.loads + self.stores:
            d += rec
        for ins in self.instrs:
            d += list(ins)
        return array.array("q", d), array.array("d", self.consts)

    def run(self, compute=F64, nthreads=1):
        desc, consts = self.pack()
        C.run_cpu(desc, consts, compute, nthreads)


SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -3.0, 1e-30, 30.0, -30.0, 100.0,
           -100.0, 1e6]


def inputs(dtype, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = (torch.randn(n, generator=g, dtype=torch.float64) * 3).tolist()
    return torch.tensor(SPECIAL + rnd, dtype=dtype)



def as01(f):
    """A bool-valued torch op as 0/1 in the input's dtype."""
    return lambda *xs: f(*xs).to(xs[0].dtype)


UNARY = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sin": torch.sin, "cos": torch.cos,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "sqrt": torch.sqrt, "abs": torch.abs, "sign": torch.sign,
    "reciprocal": torch.reciprocal, "relu": torch.relu, "log1p": torch.log1p, "expm1": torch.expm1,
    "erf": torch.erf, "rsqrt": torch.rsqrt, "tan": torch.tan, "atan": torch.atan,
    "sinh": torch.sinh, "cosh": torch.cosh, "asin": torch.asin, "acos": torch.acos,
    "asinh": torch.asinh, "acosh": torch.acosh, "atanh": torch.atanh,
    "isnan": as01(torch.isnan), "not": as01(torch.logical_not),
    "to_f32": lambda x: x.to(torch.float32).to(x.dtype),
    "to_f16": lambda x: x.to(torch.float32).to(torch.float16).to(x.dtype),
    "to_bf16": lambda x: x.to(torch.float32).to(torch.bfloat16).to(x.dtype),
}
BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "max": torch.maximum, "min": torch.minimum,
    "gt": as01(torch.gt), "ge": as01(torch.ge), "lt": as01(torch.lt), "le": as01(torch.le),
    "eq": as01(torch.eq), "ne": as01(torch.ne),
    "and": as01(torch.logical_and), "or": as01(torch.logical_or),
}
COMPUTE = [(torch.float64, F64), (torch.float32, F32)]


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-300) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-37)


def check(out, ref):
    torch.testing.assert_close(out, ref, equal_nan=True, **tol(out.dtype))


def test_op_table_complete():
    arity = C.op_arities()
    assert set(OP) == set(arity) == set(UNARY) | set(BINARY) | {"where", "load", "const", "iota", "store"}
    assert sorted(OP.values()) == list(range(len(OP)))
    assert {k for k, v in arity.items() if v == 0} == {"load", "const", "iota", "store"}
    assert DT == {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3, "int64": 4, "bool": 5, "int32": 6}


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, dtype, compute):
    x = inputs(dtype)
    out = torch.empty_like(x)
    r = Region(x.shape)
    r.store(out, r.op(name, r.load(x)))
    r.run(compute)
    check(out, UNARY[name](x))


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary(name, dtype, compute):
    v = torch.tensor(SPECIAL + [3.0, 0.25, -1.5, 7.0], dtype=dtype)
    x = v[:, None].expand(len(v), len(v)).contiguous()   # every pair of specials
    y = v[None, :].expand(len(v), len(v)).contiguous()
    x = torch.cat([x.flatten(), inputs(dtype, seed=1)])
    y = torch.cat([y.flatten(), inputs(dtype, seed=2)])
    out = torch.empty_like(x)
    r = Region(x.shape)
    r.store(out, r.op(name, r.load(x), r.load(y)))
    r.run(compute)
    check(out, BINARY[name](x, y))


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_where_is_a_select(dtype, compute):
    c = torch.tensor([1.0, 0.0, math.nan, -0.0, 2.0, 0.0], dtype=dtype)
    a = torch.tensor([1.0, math.nan, 3.0, math.inf, -1.0, 5.0], dtype=dtype)
    y = torch.tensor([math.nan, 2.0, math.nan, 4.0, math.nan, -math.inf], dtype=dtype)
    out = torch.empty_like(a)
    r = Region(a.shape)
    r.store(out, r.op("where", r.load(c), r.load(a), r.load(y)))
    r.run(compute)
    check(out, torch.where(c != 0, a, y))


def test_ieee_specials_exact():
    """exp(inf), log(0), log(-1), sqrt(-1) and NaN behave as in torch (no -ffast-math)."""
    for dtype, compute in COMPUTE:
        x = torch.tensor([math.inf, -math.inf, 0.0, -1.0, math.nan, -0.0], dtype=dtype)
        n = 4096 + 3  # long enough for the vector (libmvec) path plus a scalar tail
        x = x.repeat(n // 6 + 1)[:n]
        for name in ["exp", "log", "sqrt", "sin", "cos", "tanh", "log1p", "expm1", "sigmoid",
                     "erf", "rsqrt", "tan", "atan", "sinh", "cosh", "asin", "acos", "asinh",
                     "acosh", "atanh"]:
            out = torch.empty_like(x)
            r = Region(x.shape)
            r.store(out, r.op(name, r.load(x)))
            r.run(compute)
            ref = UNARY[name](x)
            assert torch.equal(out.isnan(), ref.isnan()), name
            inf = ref.isinf()
            assert torch.equal(out[inf], ref[inf]), name
            check(out, ref)  # finite values: within a few ulp (libmvec is not correctly rounded)


def test_const_and_pow_edge_cases():
    # pow is C pow, i.e. torch.pow with a *tensor* exponent. (torch.pow with a
    # Python-scalar exponent 0.5 / -0.5 is sqrt / rsqrt instead and differs at
    # -inf and -0: lower those to sqrt / reciprocal(sqrt) to match.)
    x = torch.tensor([0.0, -0.0, -2.0, math.nan, 1.0, math.inf, -math.inf, -8.0], dtype=torch.float64)
    for e in [0.0, 0.5, -0.5, -1.0, 2.0, 3.0, math.nan, 1.0 / 3.0]:
        out = torch.empty_like(x)
        r = Region(x.shape)
        r.store(out, r.op("pow", r.load(x), r.const(e)))
        r.run(F64)
        check(out, torch.pow(x, torch.tensor(e, dtype=torch.float64)))


@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
                                 torch.float32, torch.float64])
def test_load_store_dtypes(sdt):
    g = torch.Generator().manual_seed(3)
    if sdt.is_floating_point:
        src = torch.tensor(SPECIAL[:-1] + [65504.0, 65519.0, 65520.0, 7e-8, 3e-8, 1e-5, 1.0009765625],
                           dtype=torch.float32)
        src = torch.cat([src, torch.randn(100, generator=g) * 100]).to(sdt)
    elif sdt == torch.bool:
        src = torch.rand(50, generator=g) > 0.5
    else:
        src = torch.randint(-1000, 1000, (50,), generator=g, dtype=sdt)
    for cdt, compute in COMPUTE:
        # load sdt -> compute -> store sdt round trips exactly
        out = torch.empty_like(src)
        r = Region(src.shape)
        r.store(out, r.load(src))
        r.run(compute)
        assert torch.equal(out.isnan() if sdt.is_floating_point else out, src.isnan() if sdt.is_floating_point else src)
        if sdt.is_floating_point:
            assert torch.equal(out[~src.isnan()], src[~src.isnan()])
        # store converts like torch's casts (round to nearest even for f16/bf16)
        wide = torch.cat([src.to(cdt), torch.tensor([65519.99, 65520.0, 1e-8, 2.98e-8, 1.0 + 2 ** -11,
                                                     1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1e39, -1e39],
                                                    dtype=cdt)]) if sdt.is_floating_point else src.to(cdt)
        out = torch.empty(wide.shape, dtype=sdt)
        r = Region(wide.shape)
        r.store(out, r.load(wide))
        r.run(compute)
        ref = wide.to(sdt)
        if sdt.is_floating_point:
            assert torch.equal(out.isnan(), ref.isnan())
            assert torch.equal(out[~ref.isnan()], ref[~ref.isnan()])
        else:
            assert torch.equal(out, ref)


def test_half_all_bit_patterns():
    """Every float16 value loads exactly and every f32 -> f16 rounding matches torch."""
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    out = torch.empty(h.shape, dtype=torch.float32)
    r = Region(h.shape)
    r.store(out, r.load(h))
    r.run(F32)
    ref = h.float()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out[~ref.isnan()], ref[~ref.isnan()])
    # midpoints and neighbours of consecutive halves exercise ties-to-even
    f = ref[~ref.isnan()].sort().values
    mids = torch.cat([f, (f[1:] + f[:-1]) / 2, torch.nextafter((f[1:] + f[:-1]) / 2, f[1:])])
    for sdt in [torch.float16, torch.bfloat16]:
        out = torch.empty(mids.shape, dtype=sdt)
        r = Region(mids.shape)
        r.store(out, r.load(mids))
        r.run(F32)
        assert torch.equal(out.float(), mids.to(sdt).float()), sdt


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_broadcast_and_transposed_loads(dtype, compute):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 1, dtype=dtype, generator=g)
    b_ = torch.randn(1, 5, dtype=dtype, generator=g)
    s = torch.randn(5, 4, dtype=dtype, generator=g).t()      # non-contiguous (4, 5)
    k = torch.randn((), dtype=dtype, generator=g)             # 0-d, broadcast everywhere
    out = torch.empty(4, 5, dtype=dtype)
    r = Region([4, 5])
    x = r.op("mul", r.op("add", r.load(a), r.load(b_)), r.load(s))
    r.store(out, r.op("sub", x, r.load(k)))
    r.run(compute)
    check(out, (a + b_) * s - k)
    # transposed store
    out_t = torch.empty(5, 4, dtype=dtype)
    r = Region([4, 5])
    r.store(out_t.t(), r.op("exp", r.load(s)))
    r.run(compute)
    check(out_t, s.exp().t())


def test_iota():
    out = torch.empty(3, 7, dtype=torch.float64)
    r = Region([3, 7])
    r.store(out, r.op("add", r.iota(1, 0.5, -1.0), r.iota(0, 10.0, 0.0)))
    r.run(F64)
    ref = torch.arange(7, dtype=torch.float64) * 0.5 - 1.0 + 10.0 * torch.arange(3, dtype=torch.float64)[:, None]
    check(out, ref)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_predicated_embed(dtype, compute):
    g = torch.Generator().manual_seed(5)
    # VJP of x[:, 1]: embed g (3,) into zeros (3, 4) at column 1.
    gr = torch.randn(3, dtype=dtype, generator=g)
    out = torch.empty(3, 4, dtype=dtype)
    r = Region([3, 4])
    r.store(out, r.load(gr, strides=[gr.stride(0), 0], preds=[(1, 1, -1, 1, 1, 0)]))
    r.run(compute)
    ref = torch.zeros(3, 4, dtype=dtype)
    ref[:, 1] = gr
    check(out, ref)
    # VJP of x[:, 1::2] (x is (3, 7)): t = j - 1, every 2nd, 3 of them.
    gs = torch.randn(3, 3, dtype=dtype, generator=g)
    out = torch.full((3, 7), math.nan, dtype=dtype)
    r = Region([3, 7])
    r.store(out, r.op("mul", r.load(gs, strides=[gs.stride(0), 0], preds=[(1, 1, -1, 2, 3, gs.stride(1))]),
                      r.const(2.0)))
    r.run(compute)
    ref = torch.zeros(3, 7, dtype=dtype)
    ref[:, 1::2] = gs * 2
    check(out, ref)
    # Reversed (mul = -1) on dim 0 and a window on dim 1 of a transposed source:
    # out[i, j] = src[4 - i, j - 2] for j in [2, 5), else 0.
    src = torch.randn(3, 5, dtype=dtype, generator=g).t()    # (5, 3), strides (1, 5)
    out = torch.empty(5, 6, dtype=dtype)
    r = Region([5, 6])
    r.store(out, r.load(src, strides=[0, 0], preds=[(0, -1, 4, 1, 5, src.stride(0)),
                                                   (1, 1, -2, 1, 3, src.stride(1))]))
    r.run(compute)
    ref = torch.zeros(5, 6, dtype=dtype)
    ref[:, 2:5] = src.flip(0)
    check(out, ref)
    # An empty slice never touches memory, even through a null pointer.
    out = torch.empty(2, 3, dtype=dtype)
    desc, consts = r.pack()
    e = torch.empty(0, dtype=dtype)
    r = Region([2, 3])
    r.store(out, r.load(e, strides=[0, 0], preds=[(1, 1, 0, 1, 0, 1)]))
    r.run(compute)
    assert torch.equal(out, torch.zeros(2, 3, dtype=dtype))


def _reduce_ref(x, mode, dims):
    if mode == SUM:
        return x.sum(dims, keepdim=True)
    return (x.amax if mode == MAX else x.amin)(dims, keepdim=True)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("mode", [SUM, MAX, MIN])
@pytest.mark.parametrize("shape,dims", [((6, 50), (1,)), ((6, 50), (0,)), ((6, 50), (0, 1)),
                                        ((4, 5, 6), (0, 2)), ((4, 5, 6), (1,)), ((3, 1, 2000), (2,)),
                                        ((700, 3), (1,)), ((1, 7), (0,))])
def test_reductions(shape, dims, mode, dtype, compute):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, dtype=dtype, generator=g)
    if mode != SUM:
        x.view(-1)[3] = math.nan  # NaN propagates through max/min
    ref = _reduce_ref(x * 2, mode, dims)
    out = torch.empty(ref.shape, dtype=dtype)
    r = Region(shape)
    r.store(out, r.op("mul", r.load(x), r.const(2.0)), mode=mode)
    r.run(compute)
    check(out, ref)


def test_reduction_of_transposed_input_with_elementwise_output():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 30, dtype=torch.float64, generator=g).t()   # (30, 40) non-contiguous
    e = torch.empty(30, 40, dtype=torch.float64)
    s = torch.empty(30, 1, dtype=torch.float64)
    m = torch.empty(1, 40, dtype=torch.float64)
    # Two reductions over different dims may not share a region...
    r = Region([30, 40])
    ex = r.op("exp", r.load(x))
    r.store(e, ex)
    r.store(s, ex, mode=SUM)
    r.store(m, ex, mode=MAX)
    with pytest.raises(ValueError, match="different sets of dims"):
        r.run(F64)
    # ...but an elementwise output and a reduction may.
    r = Region([30, 40])
    ex = r.op("exp", r.load(x))
    r.store(e, ex)
    r.store(s, ex, mode=SUM)
    r.run(F64)
    check(e, x.exp())
    check(s, x.exp().sum(1, keepdim=True))


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_large_sums_multithreaded(nthreads):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1_000_003, dtype=torch.float64, generator=g)
    out = torch.empty((), dtype=torch.float64)
    r = Region(x.shape)
    r.store(out, r.load(x), mode=SUM)
    r.run(F64, nthreads)
    torch.testing.assert_close(out, x.sum(), rtol=1e-12, atol=1e-9)
    # Few long rows (cut between threads) and many short rows.
    y = x[:999_999].view(3, 333_333)
    for dims in [(1,), (0,)]:
        for mode in [SUM, MAX, MIN]:
            ref = _reduce_ref(y, mode, dims)
            out = torch.empty(ref.shape, dtype=torch.float64)
            r = Region(y.shape)
            r.store(out, r.load(y), mode=mode)
            r.run(F64, nthreads)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-9)
    # float32 compute accumulates sums in double
    ones = torch.full((1 << 21,), 1.0 + 2 ** -20, dtype=torch.float32)
    out = torch.empty((), dtype=torch.float32)
    r = Region(ones.shape)
    r.store(out, r.load(ones), mode=SUM)
    r.run(F32, nthreads)
    assert out.item() == float((1 << 21) * (1.0 + 2 ** -20))


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_large_outputs(dtype, compute, nthreads):
    # Outputs of 8 MiB or more (stream_store.h, kStreamMinBytes) are written with streaming
    # stores: one computed straight into its output, one stored from a register, one starting
    # an element past a cache line, one a transposed view (plain stores), an odd length (a
    # partial last line).
    g = torch.Generator().manual_seed(9)
    n = (8 << 20) // (4 if dtype == torch.float32 else 8) + 13
    x = torch.randn(n, dtype=dtype, generator=g)
    y = torch.randn(n, dtype=dtype, generator=g)
    outs = [torch.full((n,), math.nan, dtype=dtype), torch.full((n,), math.nan, dtype=dtype),
            torch.full((n + 1,), math.nan, dtype=dtype)[1:]]
    r = Region(x.shape)
    xr, yr = r.load(x), r.load(y)
    r.store(outs[0], r.op("mul", r.op("add", xr, yr), yr))
    r.store(outs[1], xr)
    r.store(outs[2], r.op("sub", xr, yr))
    r.run(compute, nthreads)
    xd, yd = x.double(), y.double()
    for out, ref in zip(outs, [(xd + yd) * yd, xd, xd - yd]):
        torch.testing.assert_close(out.double(), ref, **tol(dtype))
    m = x.view(-1)[: (n // 64) * 64].view(64, -1)
    t = torch.full((m.shape[1], 64), math.nan, dtype=dtype)
    r = Region(m.shape)
    r.store(t, r.op("neg", r.load(m)), strides=[1, 64])
    r.run(compute, nthreads)
    assert torch.equal(t.t(), -m)
    # beside a row sum, whose rows the threads split at fixed points (not at lines)
    rows = x.view(-1)[: (n // 1001) * 1001].view(-1, 1001)
    e = torch.full(rows.shape, math.nan, dtype=dtype)
    s = torch.empty(rows.shape[0], 1, dtype=dtype)
    r = Region(rows.shape)
    v = r.op("mul", r.load(rows), r.const(3.0))
    r.store(e, v)
    r.store(s, v, mode=SUM)
    r.run(compute, nthreads)
    assert torch.equal(e, rows * 3)
    # (sums of about 1000 values of either sign: an absolute tolerance at their scale)
    torch.testing.assert_close(s.double(), (rows.double() * 3).sum(1, keepdim=True), rtol=0,
                               atol=1e-11 if dtype == torch.float64 else 1e-4)


def test_zero_dim_and_empty():
    x = torch.tensor(0.25, dtype=torch.float64)
    out = torch.empty((), dtype=torch.float64)
    r = Region([])
    r.store(out, r.op("exp", r.load(x)))
    r.run(F64)
    check(out, x.exp())
    # empty iteration space: assign writes nothing, reductions write their identity
    e = torch.empty(0, 5, dtype=torch.float32)
    outs = {m: torch.full((1, 5), 7.0) for m in (SUM, MAX, MIN)}
    keep = torch.full((0, 5), 7.0)
    r = Region([0, 5])
    v = r.op("exp", r.load(e))
    r.store(keep, v)
    for m, o in outs.items():
        r.store(o, v, mode=m)
    r.run(F32)
    assert torch.equal(outs[SUM], torch.zeros(1, 5))
    assert torch.equal(outs[MAX], torch.full((1, 5), -math.inf))
    assert torch.equal(outs[MIN], torch.full((1, 5), math.inf))


def test_many_dims():
    g = torch.Generator().manual_seed(9)
    shape = [2, 1, 3, 2, 1, 2, 3, 2]
    x = torch.randn(*shape, dtype=torch.float64, generator=g).permute(7, 6, 5, 4, 3, 2, 1, 0)
    ref = x.sum((1, 3, 5), keepdim=True)
    out = torch.empty(ref.shape, dtype=torch.float64)
    r = Region(x.shape)
    r.store(out, r.load(x), mode=SUM)
    r.run(F64)
    check(out, ref)
    too_many = [1] * (C.max_ndim() + 1)
    with pytest.raises(ValueError, match="ndim"):
        C.run_cpu(array.array("q", [len(too_many), 0, 0, 0, 0, *too_many]), array.array("d"), 0, 1)


def _good_region():
    x = torch.ones(4, dtype=torch.float64)
    out = torch.empty(4, dtype=torch.float64)
    r = Region([4])
    r.store(out, r.op("exp", r.load(x)))
    r._keep = (x, out)
    return r


def _mutated(fn):
    r = _good_region()
    desc, consts = r.pack()
    d = list(desc)
    fn(d)
    return array.array("q", d), consts


# Offsets in the good descriptor: header 0..4, shape 5, load 6..10 (ptr, dtype,
# offset, stride, npred), store 11..14, instrs 15.. (load, exp, store).
BAD = {
    "short": lambda d: d.__delitem__(slice(10, None)),
    "trailing": lambda d: d.append(0),
    "neg_shape": lambda d: d.__setitem__(5, -1),
    "load_dtype": lambda d: d.__setitem__(7, 99),
    "store_mode": lambda d: d.__setitem__(13, 4),
    "opcode": lambda d: d.__setitem__(20, 1000),
    "reg_range": lambda d: d.__setitem__(22, 5),
    "dst_range": lambda d: d.__setitem__(21, -1),
    "load_index": lambda d: d.__setitem__(17, 1),
    "read_before_write": lambda d: d.__setitem__(27, 0) or d.__setitem__(22, 1),
    "nregs": lambda d: d.__setitem__(4, -3),
    "ninstr_huge": lambda d: d.__setitem__(3, 1 << 40),
    "npred_bad_dim": lambda d: (d.__setitem__(10, 1), d.__setitem__(slice(11, 11), [3, 1, 0, 1, 4, 1])),
    "npred_div0": lambda d: (d.__setitem__(10, 1), d.__setitem__(slice(11, 11), [0, 1, 0, 0, 4, 1])),
    "const_index": lambda d: d.__setitem__(slice(15, 18), [OP["const"], 0, 0]),
    "iota_dim": lambda d: d.__setitem__(slice(15, 20), [OP["iota"], 0, 1, 0, 0]),
    "store_index": lambda d: d.__setitem__(27, 1),
    "store_twice": lambda d: (d.__setitem__(3, 4), d.extend(d[25:30])),
    "null_load_ptr": lambda d: d.__setitem__(6, 0),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_descriptor_raises(case):
    desc, consts = _mutated(BAD[case])
    with pytest.raises(ValueError):
        C.run_cpu(desc, consts, F64, 1)


def test_bad_buffers_and_arguments():
    r = _good_region()
    desc, consts = r.pack()
    C.run_cpu(desc, consts, F64, 2)  # the good one runs
    with pytest.raises(ValueError):
        C.run_cpu(array.array("i", [1, 0, 0, 0, 0, 1]), consts, F64, 1)
    with pytest.raises(ValueError):
        C.run_cpu(desc, array.array("f", [1.0]), F64, 1)
    with pytest.raises(ValueError):
        C.run_cpu(desc, consts, 2, 1)
    with pytest.raises(ValueError):
        C.run_cpu(desc, consts, F64, 0)
    with pytest.raises(ValueError):
        C.run_cpu(desc[:0], consts, F64, 1)


def test_cuda_queries():
    assert isinstance(C.cuda_compiled(), bool)
    n = C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    assert isinstance(C.cuda_status(), str) and C.cuda_status()
    if not C.cuda_compiled():
        assert n == 0
