"""Compiled CUDA kernels (fastgrad.cuda_jit).

Everywhere NVRTC is found (the CUDA wheels beside torch, or a CUDA toolkit): the generated
source of every op, dtype and load kind must compile, and `kinds` must accept exactly the
regions the generated kernel indexes correctly. On a GPU: every op and special value through a
compiled kernel against the interpreter (run_cuda) and torch, plans taking over compiled
kernels after jit.AFTER runs (explain says so), and regions that do not fit, or a compiler that
fails, leaving the interpreter running.
"""
import types

import pytest
import torch

import fastgrad
from fastgrad import cuda_jit, jit
from conftest import TORCH_GRAD, assert_same, rand
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
    """What cuda_jit.source/kernel_for read of a region: test_vm's packer as plan.Region
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
    return r.op("add", r.op("add", acc, r.const(float("-inf"))), r.const(0.1))


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
    desc, _ = r.pack()
    loads, stores = cuda_jit.kinds(desc)
    assert [k for k, _, _ in loads] == ["c", "c", "s"]
    src = cuda_jit.source(_spec(r), [k for k, _, _ in loads], compute,
                          [dt for _, _, dt in loads], stores)
    for arch in ("80", "90"):
        key, cubin = cuda_jit.compile_cubin(src, arch)
        assert cubin[:4] == b"\x7fELF", cuda_jit.status()
    assert cuda_jit.compile_cubin(src, "90") == (key, cubin)  # (the in-process cache)


def test_a_compile_error_says_what_nvrtc_said():
    _nvrtc_or_skip()
    with pytest.raises(OSError, match="undefined|identifier"):
        cuda_jit.compile_cubin('extern "C" __global__ void fg_kernel() { nope(); }', "90")


x34 = torch.rand(3, 4, dtype=torch.float64)
out34 = torch.empty(3, 4, dtype=torch.float64)
KINDS = [  # (name, shape, load strides, load offset, load predicates, store mode, store strides)
    ("contiguous", (3, 4), [4, 1], 0, (), 0, [4, 1], [("c", 0)]),
    ("one value", (3, 4), [0, 0], 5, (), 0, [4, 1], [("s", 5)]),
    ("size-1 dim, any stride", (3, 1), [1, 7], 1, (), 0, [1, 1], [("c", 1)]),
    ("one value per row", (3, 4), [4, 0], 0, (), 0, [4, 1], None),
    ("transposed", (4, 3), [1, 4], 0, (), 0, [3, 1], None),
    ("predicated", (3, 4), [4, 1], 0, ((1, 1, 0, 1, 4, 0),), 0, [4, 1], None),
    ("store not contiguous", (3, 4), [4, 1], 0, (), 0, [1, 3], None),
    ("reducing store", (3, 4), [4, 1], 0, (), 1, [0, 1], None),
    ("no elements", (0, 4), [4, 1], 0, (), 0, [4, 1], None),
]


@pytest.mark.parametrize("name,shape,strides,offset,preds,mode,out_strides,want", KINDS,
                         ids=[k[0] for k in KINDS])
def test_kinds(name, shape, strides, offset, preds, mode, out_strides, want):
    r = V.Region(shape)
    r.store(out34, r.load(x34, strides, offset, preds), mode=mode, strides=out_strides)
    got = cuda_jit.kinds(r.pack()[0])
    if want is None:
        assert got is None
    else:
        assert [(k, off) for k, off, _ in got[0]] == want and got[1] == [V.DT["float64"]]


def test_status_says_why_without_nvrtc(monkeypatch):
    monkeypatch.setattr(cuda_jit, "_LIBS", {})
    monkeypatch.setattr(cuda_jit, "_candidates", lambda: iter(["/nonexistent/libnvrtc.so"]))
    with pytest.raises(OSError, match="NVRTC .*not found"):
        cuda_jit._nvrtc()


# ---- on a GPU -------------------------------------------------------------------------------

def _compiled_kernel(r, compute):
    """r's kernel (a cuda_jit.Kernel) for its CUDA tensors, built as the runtime builds it."""
    desc, consts = r.pack()
    packer = types.SimpleNamespace(desc=desc, compute=compute, numel=int(torch.tensor(r.shape).prod()))
    ins = [r.keep[i] for i in range(len(r.loads))]
    k = cuda_jit.kernel_for(_spec(r), packer, ins, torch.cuda.current_device())
    assert k, cuda_jit.status()
    return k, desc, consts


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
    fastgrad._C.run_cuda(desc, consts, compute, torch.cuda.current_device(),
                         torch.cuda.current_stream().cuda_stream)
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
    fastgrad._C.run_cuda(desc, consts, 0, torch.cuda.current_device(),
                         torch.cuda.current_stream().cuda_stream)
    kernel.launch([src, x], [outs[1]], torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    torch.testing.assert_close(outs[1].float(), outs[0].float(), equal_nan=True, rtol=1e-6,
                               atol=0)


def _region_compiled(y, x, go, create_graph=False):
    return "compiled loop" in str(fastgrad.explain(y, x, go, create_graph=create_graph))


CASES = [
    ("sin_exp_sum", lambda x: (torch.sin(x) * torch.exp(x)).sum(), 1, torch.float64),
    ("tanh_cube", lambda x: torch.tanh(x) ** 3, 1, torch.float64),
    ("softplus_scalar", lambda x: torch.nn.functional.softplus(x * 4) / 3.0, 1, torch.float64),
    ("tanh_cube_2nd", lambda x: torch.tanh(x) ** 3, 2, torch.float64),
    ("sigmoid_f32", lambda x: torch.sigmoid(x) * x, 1, torch.float32),
    ("exp_f16", lambda x: torch.exp(x) * x, 1, torch.float16),
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
        else:
            g = fastgrad.grad(y, x, go, create_graph=True)[0]
            got = fastgrad.grad(g, x, go, retain_graph=True)
            gr = TORCH_GRAD(yr, xr, go, create_graph=True)[0]
            ref = TORCH_GRAD(gr, xr, go)
        assert_same(got, ref, **tol)
    report = fastgrad.explain(y, x, go, create_graph=order == 2)
    assert report.all_native and "compiled loop" in str(report), str(report)


@real_gpu
def test_regions_that_do_not_fit_and_jit_off_run_the_interpreter(gen):
    # a grad_output broadcast along the rows: one value per row, which the kernel cannot index
    fn = lambda x: torch.sin(x) * torch.exp(x)  # noqa: E731
    for _ in range(jit.AFTER + 1):
        x = rand((64, 33), gen, device="cuda").requires_grad_()
        go = rand((64, 1), gen, device="cuda").expand(64, 33)
        xr = x.detach().clone().requires_grad_()
        assert_same(fastgrad.grad(fn(x), x, go), TORCH_GRAD(fn(xr), xr, go),
                    rtol=1e-12, atol=1e-12)
    assert not _region_compiled(fn(x), x, go)
    cuda_jit.enable(False)
    try:
        f2 = lambda x: torch.cos(x) * torch.exp(x) * 5.0  # noqa: E731
        for _ in range(jit.AFTER + 1):
            x = rand((999,), gen, device="cuda").requires_grad_()
            go = rand((999,), gen, device="cuda")
            xr = x.detach().clone().requires_grad_()
            assert_same(fastgrad.grad(f2(x), x, go), TORCH_GRAD(f2(xr), xr, go),
                        rtol=1e-12, atol=1e-12)
        assert not _region_compiled(f2(x), x, go)
    finally:
        cuda_jit.enable(True)


@real_gpu
def test_a_failing_compiler_leaves_the_interpreter(monkeypatch, gen):
    def fail(src, arch):
        raise OSError("NVRTC: planted failure")

    monkeypatch.setattr(cuda_jit, "compile_cubin", fail)
    fn = lambda x: torch.tanh(x) * torch.exp(x) * 7.0  # noqa: E731
    try:
        for _ in range(jit.AFTER + 1):
            x = rand((777,), gen, device="cuda").requires_grad_()
            go = rand((777,), gen, device="cuda")
            xr = x.detach().clone().requires_grad_()
            assert_same(fastgrad.grad(fn(x), x, go), TORCH_GRAD(fn(xr), xr, go),
                        rtol=1e-12, atol=1e-12)
        st = cuda_jit.status()
        assert not st["enabled"] and "planted" in st["reason"]
        assert not _region_compiled(fn(x), x, go)
    finally:
        cuda_jit.enable(True)
