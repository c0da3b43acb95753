"""Compiled CUDA kernels (fastgrad.cuda_jit).

Everywhere NVRTC is found (the CUDA wheels beside torch, or a CUDA toolkit): the generated
source of every op, dtype and load kind must compile, and `kinds` must accept exactly the
regions the generated kernel indexes correctly. On a GPU: every op and special value through a
compiled kernel against the interpreter (run_cuda) and torch, plans taking over compiled
kernels after jit.AFTER runs (explain says so), and regions that do not fit, or a compiler that
fails, leaving the interpreter running.
"""
import struct
import types

import pytest
import torch

import fastgrad
from fastgrad import cuda_codegen, cuda_jit, jit, jit_cache
from conftest import TORCH_GRAD, assert_same, rand, stand_in_driver
import test_vm as V
from test_vm_cuda import Region, real_gpu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool,
          torch.int32]


def _nvrtc_or_skip():
    try:
        cuda_jit._nvrtc()
    except OSError as e:
        pytest.skip(str(e))


def _spec(r):
    """What cuda_jit.source/kernel_for read of a region: test_vm's packer as plan_steps.Region
    fields (load i reads input i, store k writes output k)."""
    return types.SimpleNamespace(loads=[(i, None) for i in range(len(r.loads))],
                                 stores=[(k, rec[2]) for k, rec in enumerate(r.stores)],
                                 instrs=r.instrs, consts=r.consts)


def _every_op(r, a, b, c):
    acc = r.op("add", a, b)
    for name in V.UNARY:
        acc = r.op("add", acc, r.op(name, acc))
    for name in V.BINARY:
        acc = r.op(name, acc, c)
    acc = r.op("where", acc, a, r.const(float("nan")))
    acc = r.op("add", r.op("add", acc, r.const(float("-inf"))), r.const(0.1))
    return r.op("mul", acc, r.const(-0.0))  # (the constant with the sign bit alone)


def _compile(r, compute, arch="90"):
    lay = cuda_codegen.layout(r.pack()[0])
    assert lay is not None
    src = cuda_codegen.source(_spec(r), lay, compute)
    key, cubin = cuda_jit.compile_cubin(src, arch)
    assert cubin[:4] == b"\x7fELF", cuda_jit.status()
    return lay, key, cubin


@pytest.mark.parametrize("compute", [0, 1], ids=["f32", "f64"])
def test_every_op_and_dtype_compiles(compute):
    _nvrtc_or_skip()
    r = V.Region([10])
    a = r.load(torch.rand(10, dtype=torch.float64))
    b = r.load(torch.rand(10).half())
    c = r.load(torch.rand(()).to(torch.bfloat16))  # one value: "s"
    acc = _every_op(r, a, b, c)
    for dt in DTYPES:
        r.store(torch.empty(10, dtype=dt), acc)
    for arch in ("80", "90"):
        lay, key, cubin = _compile(r, compute, arch)
    assert [k for k, *_ in lay.loads] == ["c", "c", "s"]
    src = cuda_codegen.source(_spec(r), lay, compute)
    assert cuda_jit.compile_cubin(src, "90") == (key, cubin)  # (the in-process cache)


def _rows_region(shape, modes, dtype=torch.float64, device="cpu"):
    """A reduction over the last dim of ``shape`` with a strided ("g"), an embedded
    (predicated) and a per-row load, one assigning store and one reducing store per mode;
    (the region, its inputs, its outputs, torch's values of the outputs)."""
    g = torch.Generator().manual_seed(sum(shape))
    make = lambda *sh: torch.randn(*sh, generator=g, dtype=dtype).to(device)  # noqa: E731
    x, xt, row, win = make(*shape), make(*shape[::-1]).t(), make(shape[0], 1), make(shape[0], 3)
    r = Region(list(shape))
    v = r.op("mul", r.op("sin", r.load(x)), r.load(xt))  # (xt transposed: "g")
    v = r.op("add", v, r.load(row))
    v = r.op("add", v, r.load(win, [3, 0], 0, ((1, 1, -2, 1, 3, 1),)))  # at columns 2..4
    outs = [torch.full(shape, float("nan"), dtype=dtype, device=device)]
    r.store(outs[0], v)
    for mode in modes:
        outs.append(torch.full((shape[0], 1), float("nan"), dtype=dtype, device=device))
        r.store(outs[-1], v, mode=mode, strides=[1, 0])
    emb = torch.zeros(shape, dtype=torch.float64)
    emb[:, 2:5] = win.cpu().double()[:, :max(0, min(3, shape[1] - 2))]
    ref = torch.sin(x.cpu().double()) * xt.cpu().double() + row.cpu().double() + emb
    red = {V.SUM: lambda t: t.sum(1, keepdim=True), V.MAX: lambda t: t.amax(1, keepdim=True),
           V.MIN: lambda t: t.amin(1, keepdim=True)}
    return r, [x, xt, row, win], outs, [ref] + [red[m](ref) for m in modes]


@pytest.mark.parametrize("compute", [0, 1], ids=["f32", "f64"])
def test_row_reductions_and_general_loads_compile(compute):
    _nvrtc_or_skip()
    r, *_ = _rows_region((200, 37), [V.SUM, V.MAX, V.MIN])
    lay, _, _ = _compile(r, compute)
    assert lay.split == 1 and lay.rows == 200
    assert [k for k, *_ in lay.loads] == ["c", "g", "g", "g"]
    assert [s[3] for s in lay.stores] == ["c", "r", "r", "r"]
    r, *_ = _rows_region((200, 37), [])  # the same loads, elementwise
    lay, _, _ = _compile(r, compute)
    assert lay.split is None


def test_a_load_record_read_twice_compiles():
    # vm.h lets two load instructions read one record; its predicates are declared once
    _nvrtc_or_skip()
    r = V.Region([300, 8])
    win = torch.randn(300, 3, dtype=torch.float64)
    pred = ((1, 1, -2, 1, 3, 1),)
    r.load(win, [3, 0], 0, pred)
    r.instrs.append((V.OP["load"], r._reg(), 0, 0, 0))  # the same record again
    r.store(torch.empty(300, 8, dtype=torch.float64), r.op("mul", 0, 1))
    _compile(r, 1)


def test_literals_are_exact_bits():
    for v in (0.0, -0.0, 1.5, -2.0 ** -1074, float("inf"), float("-inf"), 1e308):
        text = cuda_codegen._literal(v, "double")
        bits = int(text.split("(long long)")[1].split("ULL")[0], 16)
        assert struct.pack("<Q", bits) == struct.pack("<d", v)
    assert "0x8000000000000000ULL" in cuda_codegen._literal(-0.0, "float")


@pytest.mark.parametrize("value,dtype", [(2.5, torch.float64), (-3, torch.int64),
                                         (0.1, torch.float32), (True, torch.bool),
                                         (-0.0, torch.float64), (1e-8, torch.float16)])
def test_host_scalars_keep_their_value_and_dtype(value, dtype):
    # what a wrapped Python number becomes on a CUDA call's device (here the CPU stands in)
    t = torch.tensor(value, dtype=dtype)
    got = fastgrad.engine._host_scalar_to(t, torch.device("cpu"))
    assert got.dtype == dtype and got.shape == () and got is not t
    assert torch.equal(got, t) and torch.equal(got.signbit(), t.signbit())


def test_prune_leaves_files_being_written(tmp_path):
    (tmp_path / "fg_cuda_ab.cubin.123.456.tmp").write_bytes(b"x" * 5000)  # another process's
    (tmp_path / "fg_cd.so").write_bytes(b"x" * 5000)
    assert jit_cache.prune_cache(str(tmp_path), limit=1000) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["fg_cuda_ab.cubin.123.456.tmp"]


def test_a_compile_error_says_what_nvrtc_said(monkeypatch):
    _nvrtc_or_skip()
    src = 'extern "C" __global__ void fg_kernel() { nope(); }'
    with pytest.raises(cuda_jit.CompileError, match="undefined|identifier"):
        cuda_jit.compile_cubin(src, "90")
    # the same source again: the same error, without NVRTC (a library with no functions)
    monkeypatch.setitem(cuda_jit._LIBS, "nvrtc", types.SimpleNamespace())
    with pytest.raises(cuda_jit.CompileError, match="undefined|identifier"):
        cuda_jit.compile_cubin(src, "90")


LAYOUTS = [  # (name, shape, load strides, offset, predicates, store mode, store strides,
    #          (split, load kind, store kind) or None: no kernel)
    ("contiguous", (3, 4), [4, 1], 0, (), 0, [4, 1], (None, "c", "c")),
    ("one value", (3, 4), [0, 0], 5, (), 0, [4, 1], (None, "s", "c")),
    ("size-1 dim, any stride", (3, 1), [1, 7], 1, (), 0, [1, 1], (None, "c", "c")),
    ("one value per row", (3, 4), [1, 0], 0, (), 0, [4, 1], (None, "g", "c")),
    ("transposed", (4, 3), [1, 4], 0, (), 0, [3, 1], (None, "g", "c")),
    ("predicated", (3, 4), [4, 1], 0, ((1, 1, 0, 1, 4, 0),), 0, [4, 1], (None, "g", "c")),
    ("store transposed", (3, 4), [4, 1], 0, (), 0, [1, 3], (None, "c", "g")),
    ("store broadcast", (3, 4), [4, 1], 0, (), 0, [0, 1], None),
    ("row sum", (300, 4), [4, 1], 0, (), 1, [1, 0], (1, "c", "r")),
    ("row max over dims 1, 2", (300, 2, 2), [4, 2, 1], 0, (), 2, [1, 0, 0], (1, "c", "r")),
    ("few short rows", (3, 4), [4, 1], 0, (), 1, [1, 0], (1, "c", "r")),
    ("few long rows", (3, 5000), [5000, 1], 0, (), 1, [1, 0], None),
    ("hundreds of long rows", (300, 5000), [5000, 1], 0, (), 1, [1, 0], None),
    ("many long rows", (9000, 5000), [5000, 1], 0, (), 1, [1, 0], (1, "c", "r")),
    ("a sum over size-1 dims only", (300, 1), [1, 1], 0, (), 1, [1, 1], None),
    ("column sum", (4, 300), [300, 1], 0, (), 1, [0, 1], None),
    ("no elements", (0, 4), [4, 1], 0, (), 0, [4, 1], None),
]
x_big = torch.rand(15000, dtype=torch.float64)


@pytest.mark.parametrize("name,shape,strides,offset,preds,mode,out_strides,want", LAYOUTS,
                         ids=[k[0] for k in LAYOUTS])
def test_layout(name, shape, strides, offset, preds, mode, out_strides, want):
    r = V.Region(shape)
    r.store(x_big, r.load(x_big, strides, offset, preds), mode=mode, strides=out_strides)
    lay = cuda_codegen.layout(r.pack()[0])
    if want is None:
        assert lay is None
    else:
        assert (lay.split, lay.loads[0][0], lay.stores[0][3]) == want
        assert lay.loads[0][1] == offset and lay.stores[0][1] == V.DT["float64"]


def test_status_says_why_without_nvrtc(monkeypatch):
    monkeypatch.setattr(cuda_jit, "_LIBS", {})
    monkeypatch.setattr(cuda_jit, "_candidates", lambda: iter(["/nonexistent/libnvrtc.so"]))
    with pytest.raises(OSError, match="NVRTC .*not found"):
        cuda_jit._nvrtc()


# ---- on a GPU -------------------------------------------------------------------------------

def _compiled_kernel(r, compute):
    """r's kernel (a cuda_jit.Kernel) for its CUDA tensors, built as the runtime builds it."""
    desc, consts = r.pack()
    packer = types.SimpleNamespace(desc=desc, compute=compute)
    k = cuda_jit.kernel_for(_spec(r), packer, torch.cuda.current_device())
    assert k, cuda_jit.status()
    return k, desc, consts


def _interpret(desc, consts, compute):
    fastgrad._C.run_cuda(desc, consts, compute, torch.cuda.current_device(),
                         torch.cuda.current_stream().cuda_stream)


@real_gpu
@pytest.mark.parametrize("dtype,compute", V.COMPUTE, ids=["f64", "f32"])
@pytest.mark.parametrize("op", list(V.UNARY) + list(V.BINARY) + ["where"])
def test_every_op_against_the_interpreter_and_torch(op, dtype, compute):
    xs = V.inputs(dtype)
    n = xs.numel()
    a = xs.cuda()
    b = xs.flip(0).contiguous().cuda()
    c = (xs.roll(7) > 0).to(dtype).cuda()
    r = Region([n])
    regs = [r.load(t) for t in (a, b, c)]
    arity = 1 if op in V.UNARY else (2 if op in V.BINARY else 3)
    if op == "where":
        regs = [regs[2], regs[0], regs[1]]
    out_i, out_c = (torch.full((n,), float("nan"), dtype=dtype, device="cuda") for _ in range(2))
    res = r.op(op, *regs[:arity])
    r.store(out_i, res)
    kernel, desc, consts = _compiled_kernel(r, compute)
    _interpret(desc, consts, compute)
    kernel.launch([a, b, c], [out_c], torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    # (the same op math: equal but for the last bits a multiply-add may differ in)
    torch.testing.assert_close(out_c, out_i, equal_nan=True, **V.tol(dtype))
    ops = dict(V.UNARY, **V.BINARY, where=lambda cc, x, y: torch.where(cc != 0, x, y))
    args = [t.cpu() for t in ((a,) if arity == 1 else (a, b) if arity == 2 else (c, a, b))]
    torch.testing.assert_close(out_c.cpu(), ops[op](*args), equal_nan=True, **V.tol(dtype))


@real_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, torch.bool])
def test_storage_dtypes_against_the_interpreter(dtype):
    x = V.inputs(torch.float32).cuda()
    src = x.to(dtype)
    r = Region([x.numel()])
    v = r.op("sin", r.op("add", r.load(src), r.load(x)))
    outs = [torch.zeros(x.numel(), dtype=dtype, device="cuda") for _ in range(2)]
    r.store(outs[0], v)
    kernel, desc, consts = _compiled_kernel(r, 0)
    _interpret(desc, consts, 0)
    kernel.launch([src, x], [outs[1]], torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    torch.testing.assert_close(outs[1].float(), outs[0].float(), equal_nan=True, rtol=1e-6,
                               atol=0)


@real_gpu
@pytest.mark.parametrize("dtype,compute", V.COMPUTE, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(200, 37), (1000, 3), (130, 2000)], ids=str)
def test_row_reductions_and_general_loads_against_the_interpreter(shape, dtype, compute):
    r, ins, outs, refs = _rows_region(shape, [V.SUM, V.MAX, V.MIN], dtype, "cuda")
    kernel, desc, consts = _compiled_kernel(r, compute)
    _interpret(desc, consts, compute)
    got = [torch.full_like(o, float("nan")) for o in outs]
    kernel.launch(ins, got, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    loose = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for g, o, want in zip(got, outs, refs):
        torch.testing.assert_close(g, o, **loose)  # the interpreter (sums in another order)
        torch.testing.assert_close(g.cpu().double(), want, **loose)


def _region_compiled(y, x, go, create_graph=False):
    return "compiled loop" in str(fastgrad.explain(y, x, go, create_graph=create_graph))


CASES = [
    ("sin_exp_sum", lambda x: (torch.sin(x) * torch.exp(x)).sum(), 1, torch.float64),
    ("tanh_cube", lambda x: torch.tanh(x) ** 3, 1, torch.float64),
    ("softplus_scalar", lambda x: torch.nn.functional.softplus(x * 4) / 3.0, 1, torch.float64),
    ("tanh_cube_2nd", lambda x: torch.tanh(x) ** 3, 2, torch.float64),
    ("sigmoid_f32", lambda x: torch.sigmoid(x) * x, 1, torch.float32),
    ("exp_f16", lambda x: torch.exp(x) * x, 1, torch.float16),
    ("logsumexp_rows", lambda x: torch.logsumexp(x.reshape(200, 25), 1), 1, torch.float64),
    ("softmax_rows", lambda x: torch.softmax(x.reshape(200, 25), 1), 1, torch.float64),
    ("log_softmax_rows", lambda x: torch.log_softmax(x.reshape(125, 40), -1), 1, torch.float64),
    ("amax_rows", lambda x: torch.amax(x.reshape(250, 20), 1), 1, torch.float64),
    ("mean_rows_f32", lambda x: torch.mean(x.reshape(500, 10), 1), 1, torch.float32),
    ("columns", lambda x: x.reshape(-1, 4)[:, 0] + x.reshape(-1, 4)[:, 1], 1, torch.float64),
    ("norm_rows_2nd", lambda x: (x.reshape(250, 20) ** 2).sum(1).sqrt(), 2, torch.float64),
]


@real_gpu
@pytest.mark.parametrize("name,fn,order,dtype", CASES, ids=[c[0] for c in CASES])
def test_plans_run_compiled_kernels_after_some_runs(name, fn, order, dtype, gen):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else \
        dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for k in range(jit.AFTER + 2):
        x = rand((5000,), gen, dtype=dtype, device="cuda").requires_grad_()
        y = fn(x)
        go = torch.ones_like(y) if y.dim() == 0 else rand(tuple(y.shape), gen, dtype=dtype,
                                                         device="cuda")
        xr = x.detach().clone().requires_grad_()
        yr = fn(xr)
        if order == 1:
            got = fastgrad.grad(y, x, go, retain_graph=True)
            ref = TORCH_GRAD(yr, xr, go)
        else:  # (the second grad_output has x's shape)
            go2 = rand(tuple(x.shape), gen, dtype=dtype, device="cuda")
            g = fastgrad.grad(y, x, go, create_graph=True)[0]
            got = fastgrad.grad(g, x, go2, retain_graph=True)
            gr = TORCH_GRAD(yr, xr, go, create_graph=True)[0]
            ref = TORCH_GRAD(gr, xr, go2)
        assert_same(got, ref, **tol)
    report = fastgrad.explain(y, x, go, create_graph=order == 2)
    lines = [ln for ln in str(report).splitlines() if ln.strip().startswith("region ")]
    assert report.all_native and lines, str(report)
    assert all("compiled loop" in ln for ln in lines), str(report)


def _runs_match_torch(fn, n, gen, device="cuda"):
    """fn's first-order gradient, jit.AFTER + 1 times on fresh inputs of n elements, against
    torch's; (fn(x), x, grad_output) of the last run."""
    for _ in range(jit.AFTER + 1):
        x = rand((n,), gen, device=device).requires_grad_()
        go = rand((n,), gen, device=device)
        xr = x.detach().clone().requires_grad_()
        assert_same(fastgrad.grad(fn(x), x, go), TORCH_GRAD(fn(xr), xr, go),
                    rtol=1e-12, atol=1e-12)
    return fn(x), x, go


@real_gpu
def test_regions_that_do_not_fit_and_jit_off_run_the_interpreter(gen):
    # w's gradient is a column sum (a reduction over the leading dim): no kernel here fits it
    fn = lambda x, w: torch.sin(x) * w  # noqa: E731
    for _ in range(jit.AFTER + 1):
        x = rand((64, 33), gen, device="cuda").requires_grad_()
        w = rand((33,), gen, device="cuda").requires_grad_()
        go = rand((64, 33), gen, device="cuda")
        xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))
        assert_same(fastgrad.grad(fn(x, w), (x, w), go), TORCH_GRAD(fn(xr, wr), (xr, wr), go),
                    rtol=1e-12, atol=1e-12)
    lines = [ln for ln in str(fastgrad.explain(fn(x, w), (x, w), go)).splitlines()
             if "region " in ln]
    column = [ln for ln in lines if "reduce over dims [0]" in ln]
    assert column and not any("compiled loop" in ln for ln in column), lines
    cuda_jit.enable(False)
    try:
        f2 = lambda x: torch.cos(x) * torch.exp(x) * 5.0  # noqa: E731
        assert not _region_compiled(*_runs_match_torch(f2, 999, gen))
    finally:
        cuda_jit.enable(True)


@real_gpu
def test_a_failing_compiler_leaves_the_interpreter(monkeypatch, gen):
    def fail(src, arch):
        raise OSError("NVRTC: planted failure")

    monkeypatch.setattr(cuda_jit, "compile_cubin", fail)
    fn = lambda x: torch.tanh(x) * torch.exp(x) * 7.0  # noqa: E731
    try:
        y, x, go = _runs_match_torch(fn, 777, gen)
        st = cuda_jit.status()
        assert not st["enabled"] and "planted" in st["reason"]
        assert not _region_compiled(y, x, go)
    finally:
        cuda_jit.enable(True)


def test_a_rejected_source_leaves_only_its_region_to_the_interpreter(monkeypatch):
    # NVRTC rejecting one kernel's source (say a codegen bug for one rare op) keeps that region
    # interpreted and compiling on for the others, each rejected source counted once, until
    # jit._MAX_FAILED sources failed; a failure of anything else (no NVRTC, the driver) turns
    # compiling off at once. (No GPU needed: the compiler, the architecture and the driver's
    # load are stand-ins.)
    compiled = []

    def compile_cubin(src, arch):
        if src.startswith("bad"):
            error = cuda_jit.CompileError(f"NVRTC: {src} rejected")
            raise cuda_jit._REJECTED.setdefault(src, error)  # (one error per source, as there)
        if src == "driver":
            raise OSError("cuModuleLoadData: CUDA error 999")
        compiled.append(src)
        return src, b"\x7fELF"

    monkeypatch.setattr(cuda_jit, "compile_cubin", compile_cubin)
    monkeypatch.setattr(cuda_jit, "_arch", lambda device: "90")
    monkeypatch.setattr(cuda_jit, "_function", lambda key, cubin, device: 4096)
    monkeypatch.setattr(cuda_jit, "_REJECTED", {})
    monkeypatch.setitem(cuda_jit._STATE, "enabled", True)
    monkeypatch.setitem(cuda_jit._STATE, "reason", None)
    monkeypatch.setitem(cuda_jit._STATE, "failed", 0)
    monkeypatch.setitem(cuda_jit._STATE, "last_failure", None)
    build = lambda src: cuda_jit._build(lambda: src, 0, [([0], 1)], (1, 1))  # noqa: E731
    assert isinstance(build("good 1"), cuda_jit.Kernel)
    for i in range(1, jit._MAX_FAILED):
        assert build(f"bad {i}") is False
        assert build(f"bad {i}") is False  # the same source: counted once
        st = cuda_jit.status()
        assert st["enabled"] and st["failed"] == i and f"bad {i} rejected" in st["last_failure"]
        assert isinstance(build(f"good {i + 1}"), cuda_jit.Kernel)
    assert build(f"bad {jit._MAX_FAILED}") is False
    st = cuda_jit.status()
    assert not st["enabled"] and f"{jit._MAX_FAILED} kernels failed" in st["reason"]
    assert not cuda_jit._compiles([])  # (what kernel_for and group_kernel_for ask first)
    cuda_jit.enable(True)
    assert cuda_jit.status()["failed"] == 0
    assert build("driver") is False
    st = cuda_jit.status()
    assert not st["enabled"] and "CUDA error 999" in st["reason"]
    assert compiled == [f"good {i}" for i in range(1, jit._MAX_FAILED + 1)]


def test_launches_hand_the_driver_the_kernel_its_parameters_and_context(monkeypatch):
    # Compiled kernels are launched from C++ (csrc/kernel_launch.h) through driver calls whose
    # addresses cuda_jit binds. A stand-in driver (no GPU needed) sees the kernel, grid, block,
    # stream and each parameter's value (a region's loads, then its stores, region by region),
    # the context pushed only when it is not current, and a failing launch raises with the
    # driver's code.
    seen, current, result = [], [None], [0]
    nparams = [0]

    def launch(func, grid, block, shared, stream, vals, extra):
        seen.append(("launch", func, grid, block, shared, stream, vals, extra, current[0]))
        return result[0]

    def push(ctx):
        seen.append(("push", ctx))
        current[0] = ctx
        return 0

    def pop():
        seen.append(("pop",))
        current[0] = None
        return 0

    with stand_in_driver(launch, lambda: current[0], push, pop, lambda: nparams[0]):
        ts = [torch.empty(3) for _ in range(4)]
        ptrs = [t.data_ptr() for t in ts]
        k = cuda_jit.Kernel(0x1234, 0, [([1, 0, 1], 2)], 7)
        k.ctx = 0xC0
        nparams[0] = 5
        k.launch(ts[:2], ts[2:], 0x55)
        assert seen == [("push", 0xC0),
                        ("launch", 0x1234, (7, 1, 1), (cuda_codegen.BLOCK, 1, 1), 0, 0x55,
                         [ptrs[1], ptrs[0], ptrs[1], ptrs[2], ptrs[3]], None, 0xC0),
                        ("pop",)]
        # a row group's kernel: more parameters than the launcher keeps on its stack
        seen.clear()
        current[0] = 0xC0
        parts = [([0, 1], 1)] * 12
        g = cuda_jit.Kernel(0x99, 0, parts, 3)
        g.ctx = 0xC0
        nparams[0] = 36
        g.launch_parts([(ts[k % 2:k % 2 + 2], [ts[2 + k % 2]]) for k in range(12)], 0)
        want = [p for k in range(12) for p in (ptrs[k % 2], ptrs[k % 2 + 1], ptrs[2 + k % 2])]
        assert seen == [("launch", 0x99, (3, 1, 1), (cuda_codegen.BLOCK, 1, 1), 0, None, want,
                         None, 0xC0)]  # (a null stream arrives as None)
        result[0] = 700
        monkeypatch.setitem(cuda_jit._LIBS, "cuda", types.SimpleNamespace(
            cuGetErrorString=lambda r, msg: 0))
        with pytest.raises(OSError, match="cuLaunchKernel: CUDA error 700"):
            g.launch_parts([(ts[k % 2:k % 2 + 2], [ts[2 + k % 2]]) for k in range(12)], 0)
        fastgrad._C.cuda_bind_driver(0, 0, 0, 0)
        assert fastgrad._C.cuda_launch(0x99, 0xC0, 3, 32, 0, ptrs) == -1  # (no driver bound)
