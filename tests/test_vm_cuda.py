"""Descriptor-level tests of the CUDA evaluator fastgrad._C.run_cuda.

The same hand-packed descriptors as tests/test_vm.py (its Region packer and
helpers are reused) run through run_cpu on CPU tensors and through run_cuda
on CUDA tensors; the results are compared with each other and with torch.

Everything that needs a GPU skips cleanly where torch sees no CUDA device or
fastgrad was built without CUDA; the tests of run_cuda's error behaviour run
everywhere.

Harness hook: with FASTGRAD_CUDA_EMU=<module> in the environment, "cuda"
runs go through <module>.run(desc, consts, compute) on CPU tensors instead
(a CPU emulation of csrc/vm_cuda.cu's kernels, used to check their logic on
machines without a GPU; not part of the package).
"""
import importlib
import math
import os
import sys

import pytest
import torch

C = pytest.importorskip("fastgrad._C")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_vm as V  # noqa: E402  (the descriptor packer and op tables)

OP, DT = V.OP, V.DT
ASSIGN, SUM, MAX, MIN = V.ASSIGN, V.SUM, V.MAX, V.MIN
F32, F64 = V.F32, V.F64
COMPUTE = V.COMPUTE

_EMU_NAME = os.environ.get("FASTGRAD_CUDA_EMU")
EMU = importlib.import_module(_EMU_NAME) if _EMU_NAME else None
CUDA_COMPILED = bool(getattr(C, "cuda_compiled", lambda: False)())
if EMU is not None:
    DEV, HAVE_CUDA, WHY = "cpu", True, ""
else:
    DEV = "cuda"
    if not torch.cuda.is_available():
        WHY = "no CUDA device (torch.cuda.is_available() is False)"
    elif not CUDA_COMPILED:
        WHY = "fastgrad built without CUDA (fastgrad._C.cuda_compiled() is False)"
    elif C.cuda_device_count() == 0:  # e.g. a driver too old for the CUDA runtime fastgrad was built with
        WHY = "fastgrad's CUDA runtime sees no device: " + C.cuda_status()
    else:
        WHY = ""
    HAVE_CUDA = WHY == ""
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason=WHY)
real_gpu = pytest.mark.skipif(EMU is not None or not HAVE_CUDA, reason=WHY or "needs a real GPU")


class Region(V.Region):
    """test_vm's packer, keeping the tensors it points at alive."""

    def __init__(self, shape):
        super().__init__(shape)
        self.keep = []

    def load(self, t, *args, **kw):
        self.keep.append(t)
        return super().load(t, *args, **kw)

    def store(self, t, reg, *args, **kw):
        self.keep.append(t)
        return super().store(t, reg, *args, **kw)


class _Pair:
    """Several regions run one after the other (by both() and run_cuda())."""

    def __init__(self, *rs):
        self.rs = rs

    def run(self, compute, nthreads=1):
        for r in self.rs:
            r.run(compute, nthreads)


def run_cuda(r, compute, stream=None):
    """Runs a Region (or a _Pair) through run_cuda on the current device and stream."""
    if isinstance(r, _Pair):
        for x in r.rs:
            run_cuda(x, compute, stream)
        return
    desc, consts = r.pack()
    if EMU is not None:
        EMU.run(desc, consts, compute)
        return
    dev = torch.device(DEV)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    s = stream if stream is not None else torch.cuda.current_stream(idx)
    C.run_cuda(desc, consts, compute, idx, s.cuda_stream)


def both(build, compute=F64):
    """build(dev) -> (Region, [outputs]); runs it on the CPU (run_cpu) and
    through run_cuda; returns (cpu outputs, cuda outputs), both on the CPU."""
    rc, oc = build("cpu")
    rc.run(compute, nthreads=2)
    rg, og = build(DEV)
    run_cuda(rg, compute)
    return [o.cpu() for o in oc], [o.cpu() for o in og]


def check(out, ref, **kw):
    tol = dict(V.tol(out.dtype)) if out.dtype in (torch.float32, torch.float64) else dict(rtol=0, atol=0)
    tol.update(kw)
    torch.testing.assert_close(out, ref, equal_nan=True, **tol)


def check3(gpu, cpu, ref, **kw):
    """The CUDA result matches torch and the CPU evaluator, with the same NaN/inf positions."""
    for g, c, t in zip(gpu, cpu, ref):
        t = t.cpu()
        if g.is_floating_point():
            assert torch.equal(g.isnan(), t.isnan()), "NaN positions differ from torch"
            inf = t.isinf()
            assert torch.equal(g[inf], t[inf]), "inf values differ from torch"
        check(g, t, **kw)
        check(g, c, **kw)


def td(t):
    """A CPU template tensor on DEV (same values, same strides)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEV)
    out.copy_(t)
    return out


# ---- elementwise -------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype,compute", COMPUTE, ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(V.UNARY))
def test_cuda_unary(name, dtype, compute):
    x = V.inputs(dtype, n=300)

    def build(dev):
        xd = td(x) if dev != "cpu" else x
        out = torch.empty(x.shape, dtype=dtype, device=dev)
        r = Region(x.shape)
        r.store(out, r.op(name, r.load(xd)))
        return r, [out]

    cpu, gpu = both(build, compute)
    check3(gpu, cpu, [V.UNARY[name](x)])


@needs_cuda
@pytest.mark.parametrize("dtype,compute", COMPUTE, ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(V.BINARY) + ["where"])
def test_cuda_binary_and_where(name, dtype, compute):
    v = torch.tensor(V.SPECIAL + [3.0, 0.25, -1.5, 7.0], dtype=dtype)
    x = torch.cat([v[:, None].expand(len(v), len(v)).flatten(), V.inputs(dtype, seed=1)])
    y = torch.cat([v[None, :].expand(len(v), len(v)).flatten(), V.inputs(dtype, seed=2)])
    z = torch.roll(y, 5)

    def build(dev):
        xs = [x, y, z] if dev == "cpu" else [td(x), td(y), td(z)]
        out = torch.empty(x.shape, dtype=dtype, device=dev)
        r = Region(x.shape)
        args = [r.load(t) for t in (xs if name == "where" else xs[:2])]
        r.store(out, r.op(name, *args))
        return r, [out]

    cpu, gpu = both(build, compute)
    ref = torch.where(x != 0, y, z) if name == "where" else V.BINARY[name](x, y)
    check3(gpu, cpu, [ref])


@needs_cuda
def test_cuda_pow_edge_cases():
    x = torch.tensor([0.0, -0.0, -2.0, math.nan, 1.0, math.inf, -math.inf, -8.0], dtype=torch.float64)
    for dtype, compute in COMPUTE:
        xx = x.to(dtype)
        for e in [0.0, 0.5, -0.5, -1.0, 2.0, 3.0, math.nan, 1.0 / 3.0]:
            def build(dev):
                xd = xx if dev == "cpu" else td(xx)
                out = torch.empty(xx.shape, dtype=dtype, device=dev)
                r = Region(xx.shape)
                r.store(out, r.op("pow", r.load(xd), r.const(e)))
                return r, [out]

            cpu, gpu = both(build, compute)
            check3(gpu, cpu, [torch.pow(xx, torch.tensor(e, dtype=dtype))])


@needs_cuda
@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
                                 torch.float32, torch.float64])
def test_cuda_load_store_dtypes(sdt):
    g = torch.Generator().manual_seed(3)
    if sdt.is_floating_point:
        src = torch.tensor(V.SPECIAL[:-1] + [65504.0, 65519.0, 65520.0, 7e-8, 3e-8, 1e-5, 1.0009765625],
                           dtype=torch.float32)
        src = torch.cat([src, torch.randn(100, generator=g) * 100]).to(sdt)
    elif sdt == torch.bool:
        src = torch.rand(50, generator=g) > 0.5
    else:
        src = torch.randint(-1000, 1000, (50,), generator=g, dtype=sdt)
    for cdt, compute in COMPUTE:
        wide = src.to(cdt)
        if sdt.is_floating_point:
            wide = torch.cat([wide, torch.tensor([65519.99, 65520.0, 1e-8, 2.98e-8, 1.0 + 2 ** -11,
                                                  1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1e39, -1e39], dtype=cdt)])

        def build(dev):
            s, w = (src, wide) if dev == "cpu" else (td(src), td(wide))
            o1 = torch.empty(src.shape, dtype=sdt, device=dev)   # load sdt -> store sdt
            o2 = torch.empty(wide.shape, dtype=sdt, device=dev)  # load compute -> store sdt
            o3 = torch.empty(src.shape, dtype=cdt, device=dev)   # load sdt -> store compute
            r = Region(src.shape)
            r.store(o1, r.load(s))
            r.store(o3, r.load(s))
            r2 = Region(wide.shape)
            r2.store(o2, r2.load(w))
            return _Pair(r, r2), [o1, o2, o3]

        cpu, gpu = both(build, compute)
        refs = [src, wide.to(sdt), src.to(cdt)]
        for gg, cc, rr in zip(gpu, cpu, refs):
            if rr.is_floating_point():
                assert torch.equal(gg.isnan(), rr.isnan())
                assert torch.equal(gg[~rr.isnan()], rr[~rr.isnan()])
            else:
                assert torch.equal(gg, rr)
            assert torch.equal(gg.view(-1).view(torch.uint8), cc.view(-1).view(torch.uint8)) or \
                (gg.is_floating_point() and torch.equal(gg.isnan(), cc.isnan()))


@needs_cuda
def test_cuda_half_all_bit_patterns():
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    ref = h.float()
    f = ref[~ref.isnan()].sort().values
    mids = torch.cat([f, (f[1:] + f[:-1]) / 2, torch.nextafter((f[1:] + f[:-1]) / 2, f[1:])])
    hd = td(h)
    out = torch.empty(h.shape, dtype=torch.float32, device=DEV)
    r = Region(h.shape)
    r.store(out, r.load(hd))
    run_cuda(r, F32)
    out = out.cpu()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out[~ref.isnan()], ref[~ref.isnan()])
    md = td(mids)
    for sdt in [torch.float16, torch.bfloat16]:
        o = torch.empty(mids.shape, dtype=sdt, device=DEV)
        r = Region(mids.shape)
        r.store(o, r.load(md))
        run_cuda(r, F32)
        assert torch.equal(o.cpu().float(), mids.to(sdt).float()), sdt


@needs_cuda
@pytest.mark.parametrize("dtype,compute", COMPUTE, ids=["f64", "f32"])
def test_cuda_broadcast_transposed_and_0d_loads(dtype, compute):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(40, 1, dtype=dtype, generator=g)
    b_ = torch.randn(1, 50, dtype=dtype, generator=g)
    s = torch.randn(50, 40, dtype=dtype, generator=g).t()      # non-contiguous (40, 50)
    k = torch.randn((), dtype=dtype, generator=g)

    def build(dev):
        A, B, S, K = (a, b_, s, k) if dev == "cpu" else (td(a), td(b_), td(s), td(k))
        out = torch.empty(40, 50, dtype=dtype, device=dev)
        out_t = torch.empty(50, 40, dtype=dtype, device=dev)
        r = Region([40, 50])
        x = r.op("mul", r.op("add", r.load(A), r.load(B)), r.load(S))
        r.store(out, r.op("sub", x, r.load(K)))
        r.store(out_t.t(), r.op("exp", r.load(S)))            # transposed store
        return r, [out, out_t]

    cpu, gpu = both(build, compute)
    check3(gpu, cpu, [(a + b_) * s - k, s.exp().t()])


@needs_cuda
@pytest.mark.parametrize("shape", [(1000, 1003), (7, 1, 300, 5), (1 << 20,)])
def test_cuda_large_strided_elementwise(shape):
    """Many elements per thread (grid-stride odometer) over permuted strides."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(*reversed(shape), dtype=torch.float32, generator=g)
    x = base.permute(*reversed(range(len(shape))))            # (shape), reversed strides
    y = torch.randn(shape[-1], dtype=torch.float32, generator=g)  # broadcast on the last dim

    def build(dev):
        X, Y = (x, y) if dev == "cpu" else (td(x), td(y))
        out = torch.empty(shape, dtype=torch.float32, device=dev)
        r = Region(shape)
        r.store(out, r.op("add", r.op("mul", r.load(X), r.const(3.0)), r.load(Y)))
        return r, [out]

    cpu, gpu = both(build, F32)
    check3(gpu, cpu, [x * 3.0 + y])


@needs_cuda
def test_cuda_iota_consts_and_int_bool_loads():
    i64 = torch.arange(-20, 40, dtype=torch.int64).view(3, 20)
    i32 = torch.arange(60, dtype=torch.int32).view(3, 20) * 7
    msk = (torch.arange(60) % 3 == 0).view(3, 20)
    x = torch.linspace(-2, 2, 60, dtype=torch.float64).view(3, 20)

    def build(dev):
        I64, I32, M, X = (i64, i32, msk, x) if dev == "cpu" else (td(i64), td(i32), td(msk), td(x))
        out = torch.empty(3, 20, dtype=torch.float64, device=dev)
        out_i = torch.empty(3, 20, dtype=torch.int64, device=dev)
        out_b = torch.empty(3, 20, dtype=torch.bool, device=dev)
        r = Region([3, 20])
        io = r.op("add", r.iota(1, 0.5, -1.0), r.iota(0, 10.0, 0.0))
        v = r.op("where", r.load(M), r.op("add", r.load(I64), r.load(X)), r.op("mul", r.load(I32), io))
        r.store(out, v)
        r.store(out_i, r.op("mul", v, r.const(2.5)))
        r.store(out_b, r.op("gt", v, r.const(0.0)))
        return r, [out, out_i, out_b]

    cpu, gpu = both(build, F64)
    io = torch.arange(20, dtype=torch.float64) * 0.5 - 1.0 + 10.0 * torch.arange(3, dtype=torch.float64)[:, None]
    ref = torch.where(msk, i64 + x, i32.double() * io)
    check3(gpu, cpu, [ref, (ref * 2.5).to(torch.int64), ref > 0])


@needs_cuda
@pytest.mark.parametrize("dtype,compute", COMPUTE, ids=["f64", "f32"])
def test_cuda_predicated_loads(dtype, compute):
    g = torch.Generator().manual_seed(5)
    gr = torch.randn(3, dtype=dtype, generator=g)
    gs = torch.randn(3, 3, dtype=dtype, generator=g)
    src = torch.randn(3, 5, dtype=dtype, generator=g).t()      # (5, 3), strides (1, 5)
    e = torch.empty(0, dtype=dtype)

    def build(dev):
        GR, GS, SRC, E = (gr, gs, src, e) if dev == "cpu" else (td(gr), td(gs), td(src), td(e))
        o1 = torch.empty(3, 4, dtype=dtype, device=dev)
        o2 = torch.full((3, 7), math.nan, dtype=dtype, device=dev)
        o3 = torch.empty(5, 6, dtype=dtype, device=dev)
        o4 = torch.full((2, 3), math.nan, dtype=dtype, device=dev)
        r1 = Region([3, 4])
        r1.store(o1, r1.load(GR, strides=[GR.stride(0), 0], preds=[(1, 1, -1, 1, 1, 0)]))
        r2 = Region([3, 7])
        r2.store(o2, r2.op("mul", r2.load(GS, strides=[GS.stride(0), 0], preds=[(1, 1, -1, 2, 3, GS.stride(1))]),
                          r2.const(2.0)))
        r3 = Region([5, 6])
        r3.store(o3, r3.load(SRC, strides=[0, 0], preds=[(0, -1, 4, 1, 5, SRC.stride(0)),
                                                       (1, 1, -2, 1, 3, SRC.stride(1))]))
        r4 = Region([2, 3])   # an empty slice never touches memory, even through a null pointer
        r4.store(o4, r4.load(E, strides=[0, 0], preds=[(1, 1, 0, 1, 0, 1)]))
        return _Pair(r1, r2, r3, r4), [o1, o2, o3, o4]

    cpu, gpu = both(build, compute)
    ref1 = torch.zeros(3, 4, dtype=dtype)
    ref1[:, 1] = gr
    ref2 = torch.zeros(3, 7, dtype=dtype)
    ref2[:, 1::2] = gs * 2
    ref3 = torch.zeros(5, 6, dtype=dtype)
    ref3[:, 2:5] = src.flip(0)
    check3(gpu, cpu, [ref1, ref2, ref3, torch.zeros(2, 3, dtype=dtype)])


# ---- reductions ----------------------------------------------------------------

RED_SHAPES = [((6, 50), (1,)), ((6, 50), (0,)), ((6, 50), (0, 1)), ((4, 5, 6), (0, 2)), ((4, 5, 6), (1,)),
              ((3, 1, 2000), (2,)), ((700, 3), (1,)), ((1, 7), (0,)), ((5000, 3), (0,)), ((3, 5000), (1,)),
              ((2, 3, 4, 5), (1, 3)), ((64, 33), (0,)), ((100_003,), (0,)), ((3, 70, 40), (0, 1))]


@needs_cuda
@pytest.mark.parametrize("dtype,compute", COMPUTE, ids=["f64", "f32"])
@pytest.mark.parametrize("mode", [SUM, MAX, MIN], ids=["sum", "max", "min"])
@pytest.mark.parametrize("shape,dims", RED_SHAPES, ids=["x".join(map(str, s)) + "-r" + "".join(map(str, d)) for s, d in RED_SHAPES])
def test_cuda_reductions(shape, dims, mode, dtype, compute):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, dtype=dtype, generator=g)
    if mode != SUM:
        x.view(-1)[3] = math.nan  # NaN propagates through max/min
    ref = V._reduce_ref(x * 2, mode, dims)

    def build(dev):
        X = x if dev == "cpu" else td(x)
        out = torch.full(ref.shape, 7.0, dtype=dtype, device=dev)
        r = Region(shape)
        r.store(out, r.op("mul", r.load(X), r.const(2.0)), mode=mode)
        return r, [out]

    cpu, gpu = both(build, compute)
    if dtype == torch.float64:
        kw = dict(rtol=1e-12, atol=1e-9)
    else:  # torch sums float32 in float32, fastgrad in double
        kw = dict(rtol=1e-5, atol=1e-4) if mode == SUM else {}
    check3(gpu, cpu, [ref], **kw)


@needs_cuda
def test_cuda_reduction_of_transposed_input_with_elementwise_output():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 30, dtype=torch.float64, generator=g).t()   # (30, 40) non-contiguous
    for dims in [(1,), (0,)]:
        def build(dev):
            X = x if dev == "cpu" else td(x)
            e = torch.empty(30, 40, dtype=torch.float64, device=dev)
            shp = [1 if d in dims else n for d, n in enumerate((30, 40))]
            s = torch.empty(shp, dtype=torch.float64, device=dev)
            m = torch.empty(shp, dtype=torch.float64, device=dev)
            r = Region([30, 40])
            ex = r.op("exp", r.load(X))
            r.store(e, ex)
            r.store(s, ex, mode=SUM)
            r.store(m, ex, mode=MAX)
            return r, [e, s, m]

        cpu, gpu = both(build, F64)
        check3(gpu, cpu, [x.exp(), x.exp().sum(dims, keepdim=True), x.exp().amax(dims, keepdim=True)])


@needs_cuda
@pytest.mark.parametrize("shape,dims", [((12, 1000), (1,)), ((1000, 12), (0,)), ((30_000,), (0,))])
def test_cuda_many_reducing_stores(shape, dims):
    """More reducing stores than one pass holds (kMaxAcc = 8), plus an assigning store."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    modes = [SUM, MAX, MIN] * 4  # 12 reducing stores
    rshape = V._reduce_ref(x, SUM, dims).shape

    def build(dev):
        X = x if dev == "cpu" else td(x)
        outs = [torch.full(rshape, 7.0, dtype=torch.float32 if i % 2 else torch.float64, device=dev)
                for i in range(len(modes))]
        e = torch.empty(shape, dtype=torch.float64, device=dev)
        r = Region(shape)
        v = r.load(X)
        r.store(e, r.op("neg", v))
        for i, (o, m) in enumerate(zip(outs, modes)):
            r.store(o, r.op("mul", v, r.const(i + 1.0)), mode=m)
        return r, outs + [e]

    cpu, gpu = both(build, F64)
    refs = [V._reduce_ref(x * (i + 1.0), m, dims).to(torch.float32 if i % 2 else torch.float64)
            for i, m in enumerate(modes)]
    check3(gpu, cpu, refs + [-x], rtol=1e-6, atol=1e-9)


@needs_cuda
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("compute", [F32, F64], ids=["f32", "f64"])
def test_cuda_many_registers(reduce, compute):
    """nregs > the local register array (32): the register file lives in scratch."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(300, 70, dtype=torch.float64, generator=g)
    n = 45
    dt = torch.float64 if compute == F64 else torch.float32
    xx = x.to(dt)

    def build(dev):
        X = xx if dev == "cpu" else td(xx)
        out = torch.empty((300, 1) if reduce else (300, 70), dtype=dt, device=dev)
        r = Region([300, 70])
        v = r.load(X)
        terms = [r.op("mul", v, r.const(k + 1.0)) for k in range(n)]  # all live at once
        s = terms[0]
        for t in terms[1:]:
            s = r.op("add", s, t)
        r.store(out, s, mode=SUM if reduce else ASSIGN)
        assert r.nregs > 2 * n
        return r, [out]

    cpu, gpu = both(build, compute)
    ref = xx * float(n * (n + 1) // 2)
    if reduce:
        ref = ref.sum(1, keepdim=True)
    check3(gpu, cpu, [ref], rtol=1e-5 if compute == F32 else 1e-12, atol=1e-9)


@needs_cuda
@pytest.mark.parametrize("reduce", [False, True])
def test_cuda_large_program(reduce):
    """A program larger than the kernel-parameter space (device-buffer fallback)."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(50, 20, dtype=torch.float64, generator=g)
    n = 400

    def build(dev):
        X = x if dev == "cpu" else td(x)
        out = torch.empty((50, 1) if reduce else (50, 20), dtype=torch.float64, device=dev)
        r = Region([50, 20])
        s = r.load(X)
        for k in range(n):
            s = r.op("add", s, r.const(1.0 / (k + 1)))
        r.store(out, s, mode=SUM if reduce else ASSIGN)
        return r, [out]

    cpu, gpu = both(build, F64)
    h = 0.0
    for k in range(n):
        h += 1.0 / (k + 1)
    ref = x + h
    if reduce:
        ref = ref.sum(1, keepdim=True)
    check3(gpu, cpu, [ref], rtol=1e-12, atol=1e-9)


@needs_cuda
def test_cuda_sums_accumulate_in_double_and_are_deterministic():
    n = 1 << 20
    ones = torch.full((n,), 1.0 + 2 ** -20, dtype=torch.float32)
    od = td(ones)
    res = []
    for _ in range(2):
        out = torch.empty((), dtype=torch.float32, device=DEV)
        r = Region(ones.shape)
        r.store(out, r.load(od), mode=SUM)
        run_cuda(r, F32)
        res.append(out.cpu())
    assert res[0].item() == float(n * (1.0 + 2 ** -20))
    g = torch.Generator().manual_seed(8)
    x = td(torch.randn(300_007, dtype=torch.float64, generator=g))
    outs = []
    for _ in range(3):
        out = torch.empty((), dtype=torch.float64, device=DEV)
        r = Region(x.shape)
        r.store(out, r.op("exp", r.load(x)), mode=SUM)
        run_cuda(r, F64)
        outs.append(out.cpu())
    assert outs[0].item() == outs[1].item() == outs[2].item()  # bitwise: no atomics
    torch.testing.assert_close(outs[0], x.cpu().exp().sum(), rtol=1e-12, atol=0)


@needs_cuda
def test_cuda_many_dims():
    g = torch.Generator().manual_seed(9)
    shape = [2, 1, 3, 2, 1, 2, 3, 2]
    x = torch.randn(*shape, dtype=torch.float64, generator=g).permute(7, 6, 5, 4, 3, 2, 1, 0)
    ref = x.sum((1, 3, 5), keepdim=True)
    y = torch.randn([2] * 16, dtype=torch.float64, generator=g).permute(*reversed(range(16)))

    def build(dev):
        X, Y = (x, y) if dev == "cpu" else (td(x), td(y))
        out = torch.empty(ref.shape, dtype=torch.float64, device=dev)
        out2 = torch.empty(y.shape, dtype=torch.float64, device=dev)
        r = Region(x.shape)
        r.store(out, r.load(X), mode=SUM)
        r2 = Region(y.shape)
        r2.store(out2, r2.op("add", r2.load(Y), r2.iota(15, 1.0, 0.0)))
        return _Pair(r, r2), [out, out2]

    cpu, gpu = both(build, F64)
    check3(gpu, cpu, [ref, y + torch.arange(2, dtype=torch.float64)])


@needs_cuda
def test_cuda_zero_dim_and_empty():
    x = torch.tensor(0.25, dtype=torch.float64)
    xd = td(x)
    out = torch.empty((), dtype=torch.float64, device=DEV)
    r = Region([])
    r.store(out, r.op("exp", r.load(xd)))
    run_cuda(r, F64)
    check(out.cpu(), x.exp())
    # empty iteration space: assign writes nothing, reductions write their identity
    e = torch.empty(0, 5, dtype=torch.float32, device=DEV)
    outs = {m: torch.full((1, 5), 7.0, device=DEV) for m in (SUM, MAX, MIN)}
    half = torch.full((1, 5), 7.0, dtype=torch.float16, device=DEV)
    keep = torch.full((0, 5), 7.0, device=DEV)
    r = Region([0, 5])
    v = r.op("exp", r.load(e))
    r.store(keep, v)
    for m, o in outs.items():
        r.store(o, v, mode=m)
    r.store(half, v, mode=MAX)
    run_cuda(r, F32)
    assert torch.equal(outs[SUM].cpu(), torch.zeros(1, 5))
    assert torch.equal(outs[MAX].cpu(), torch.full((1, 5), -math.inf))
    assert torch.equal(outs[MIN].cpu(), torch.full((1, 5), math.inf))
    assert torch.equal(half.cpu(), torch.full((1, 5), -math.inf, dtype=torch.float16))
    # reducing over the empty dim of a (3, 0) space into (3, 1), transposed output
    o = torch.full((1, 3), 7.0, dtype=torch.float64, device=DEV)
    r = Region([3, 0])
    r.store(o.t(), r.load(torch.empty(3, 0, dtype=torch.float64, device=DEV)), mode=SUM)
    run_cuda(r, F64)
    assert torch.equal(o.cpu(), torch.zeros(1, 3, dtype=torch.float64))


@pytest.mark.skipif(not CUDA_COMPILED and EMU is None, reason="fastgrad built without CUDA")
@pytest.mark.parametrize("case", sorted(V.BAD))
def test_cuda_malformed_descriptor_raises(case):
    """The descriptor is validated before any device is touched (also without a GPU)."""
    desc, consts = V._mutated(V.BAD[case])
    with pytest.raises(ValueError):
        if EMU is not None:
            EMU.run(desc, consts, F64)
        else:
            C.run_cuda(desc, consts, F64, 0, 0)
