"""fastgrad._C.Program: a region descriptor parsed once, then run on new tensors each call
(the runtime's cache-hit path on the CPU). Descriptors come from test_vm's hand packer."""
import array

import pytest
import torch

import fastgrad
from test_vm import ASSIGN, C, F32, F64, SUM, Region


def _program(region, compute, load_src, store_dst, nins, nouts):
    desc, consts = region.pack()
    return C.Program(desc, consts, compute, load_src, store_dst, nins, nouts)


def _sin_mul_add(shape, dtype):
    """out = sin(a) * b + a, with a and b loaded in that order."""
    a, b, out = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    r = Region(shape)
    ra, rb = r.load(a), r.load(b)
    r.store(out, r.op("add", r.op("mul", r.op("sin", ra), rb), ra))
    return r


@pytest.mark.parametrize("dtype,compute", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("shape,nthreads", [((7, 5), 1), ((300, 257), 2)])
def test_program_runs_on_new_tensors(shape, nthreads, dtype, compute):
    prog = _program(_sin_mul_add(shape, dtype), compute, [0, 1], [0], 2, 1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # each run reads the data pointers of the tensors it is given
        a = torch.randn(shape, dtype=dtype, generator=gen)
        b = torch.randn(shape, dtype=dtype, generator=gen)
        out = torch.full(shape, float("nan"), dtype=dtype)
        prog.run([a, b], [out], nthreads)
        ref = torch.sin(a.double()) * b.double() + a.double()
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.double(), ref, **tol)


def test_program_maps_loads_and_stores_to_tensors():
    # Loads 0 and 1 both read input 1 (b), input 0 is unused; the store writes output 1.
    shape = (64,)
    r = Region(shape)
    t = torch.empty(shape, dtype=torch.float64)
    x = r.load(t)
    y = r.load(t)
    r.store(torch.empty(shape, dtype=torch.float64), r.op("sub", r.op("exp", x), y))
    prog = _program(r, F64, [1, 1], [1], 2, 2)
    a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    o0, o1 = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    prog.run([a, b], [o0, o1], 1)
    torch.testing.assert_close(o1, torch.exp(b) - b, rtol=1e-12, atol=1e-12)
    assert torch.equal(o0, torch.zeros(shape, dtype=torch.float64))


@pytest.mark.parametrize("nthreads", [1, 2])
def test_program_row_sum(nthreads):
    shape = (513, 129)
    x = torch.empty(shape, dtype=torch.float64)
    s = torch.empty(shape[0], 1, dtype=torch.float64)
    r = Region(shape)
    r.store(s, r.op("mul", r.load(x), r.load(x)), mode=SUM)
    prog = _program(r, F64, [0, 0], [0], 1, 1)
    for seed in (1, 2):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        s = torch.empty(shape[0], 1, dtype=torch.float64)
        prog.run([x], [s], nthreads)
        torch.testing.assert_close(s, (x * x).sum(1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_program_group_matches_run_cpu_group():
    shape = [4099, 256]
    gen = torch.Generator().manual_seed(5)
    y, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    def regions(s, out):
        a = Region(shape)
        a.store(s, a.op("mul", a.load(g), a.load(y)), mode=SUM)
        b = Region(shape)
        yb, gb = b.load(y), b.load(g)
        b.store(out, b.op("mul", yb, b.op("sub", gb, b.load(s))))
        return a, b

    s1, out1 = torch.empty(shape[0], 1), torch.empty(shape)
    packed = [r.pack() for r in regions(s1, out1)]
    assert C.run_cpu_group([d for d, _ in packed], [c for _, c in packed], [F32, F32], 1, 2) > 1
    s2, out2 = torch.empty(shape[0], 1), torch.empty(shape)
    a, b = regions(s2, out2)
    progs = [_program(a, F32, [0, 1], [0], 2, 1), _program(b, F32, [0, 1, 2], [0], 3, 1)]
    s3, out3 = torch.empty(shape[0], 1), torch.empty(shape)  # not the tensors packed above
    assert C.run_program_group(progs, [[g, y], [y, g, s3]], [[s3], [out3]], 1, 2) > 1
    assert torch.equal(s3, s1) and torch.equal(out3, out1)


def test_program_rejects_bad_arguments():
    r = _sin_mul_add((4,), torch.float64)
    desc, consts = r.pack()
    with pytest.raises(ValueError, match="load source"):
        C.Program(desc, consts, F64, [0, 2], [0], 2, 1)
    with pytest.raises(ValueError, match="store destination"):
        C.Program(desc, consts, F64, [0, 1], [1], 2, 1)
    with pytest.raises(ValueError, match="one source per load"):
        C.Program(desc, consts, F64, [0], [0], 2, 1)
    with pytest.raises(ValueError, match="compute_dtype"):
        C.Program(desc, consts, 2, [0, 1], [0], 2, 1)
    with pytest.raises(ValueError, match="too short"):
        C.Program(array.array("q", list(desc)[:-3]), consts, F64, [0, 1], [0], 2, 1)
    prog = C.Program(desc, consts, F64, [0, 1], [0], 2, 1)
    t = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected 2 tensors, got 1"):
        prog.run([t], [t], 1)
    with pytest.raises(ValueError, match="nthreads"):
        prog.run([t, t], [t], 0)
    with pytest.raises(AttributeError):
        prog.run([t, object()], [t], 1)


def test_cached_plan_reads_each_calls_tensors():
    # The second and third calls hit the plan cache (same graph signature) and must compute
    # on their own tensors, not on the first call's.
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(3000, dtype=torch.float64, generator=gen).requires_grad_()
        go = torch.randn(3000, dtype=torch.float64, generator=gen)
        y = torch.tanh(x) * torch.exp(x)
        got = fastgrad.grad(y, x, go)[0]
        x2 = x.detach().clone().requires_grad_()
        ref = torch.autograd.grad(torch.tanh(x2) * torch.exp(x2), x2, go)[0]
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
