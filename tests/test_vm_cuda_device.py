"""The CUDA evaluator (fastgrad._C.run_cuda) and its host side: streams, device indices,
pointer checks, more than 2^31 elements (on a GPU), and clean errors without one. The
descriptors are packed with tests/test_vm_cuda.py's helpers."""
import math

import pytest
import torch

from test_vm_cuda import (C, CUDA_COMPILED, EMU, F32, F64, HAVE_CUDA, MAX, MIN, SUM, Region,  # noqa: F401
                          real_gpu, run_cuda)


@real_gpu
def test_cuda_runs_on_the_given_stream():
    s = torch.cuda.Stream()
    x = torch.zeros(1 << 16, dtype=torch.float32, device="cuda")
    out = torch.full_like(x, math.nan)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(20_000_000)  # keep s busy, so a launch on another stream would run first
        x.fill_(3.0)
        r = Region(x.shape)
        r.store(out, r.op("exp", r.load(x)))
        run_cuda(r, F32, stream=s)    # asynchronous: returns at once
    s.synchronize()
    assert torch.equal(out.cpu(), torch.full((1 << 16,), math.exp(3.0), dtype=torch.float32))
    # the legacy default stream (handle 0) works too
    out2 = torch.empty_like(x)
    r = Region(x.shape)
    r.store(out2, r.op("neg", r.load(x)))
    desc, consts = r.pack()
    C.run_cuda(desc, consts, F32, torch.cuda.current_device(), 0)
    torch.cuda.synchronize()
    assert torch.equal(out2.cpu(), -x.cpu())


@real_gpu
def test_cuda_device_index_and_current_device():
    n = torch.cuda.device_count()
    x = torch.ones(10, device="cuda:0")
    r = Region(x.shape)
    r.store(x, r.op("neg", r.load(x)))
    desc, consts = r.pack()
    with pytest.raises(RuntimeError, match="out of range"):
        C.run_cuda(desc, consts, F32, n, 0)
    with pytest.raises(RuntimeError, match="out of range"):
        C.run_cuda(desc, consts, F32, -1, 0)
    with pytest.raises(ValueError):
        C.run_cuda(desc, consts, 2, 0, 0)
    if n > 1:
        y = torch.ones(10, device="cuda:1")
        r = Region(y.shape)
        r.store(y, r.op("neg", r.load(y)))
        d1, c1 = r.pack()
        before = torch.cuda.current_device()
        C.run_cuda(d1, c1, F32, 1, torch.cuda.current_stream(1).cuda_stream)
        assert torch.cuda.current_device() == before
        torch.cuda.synchronize(1)
        assert torch.equal(y.cpu(), -torch.ones(10))
        with pytest.raises(ValueError, match="not memory of cuda:0"):  # a cuda:1 tensor on device 0
            C.run_cuda(d1, c1, F32, 0, 0)


@real_gpu
def test_cuda_rejects_host_pointers():
    x = torch.ones(10)  # CPU tensor
    out = torch.empty(10, device="cuda")
    r = Region(x.shape)
    r.store(out, r.load(x))
    desc, consts = r.pack()
    with pytest.raises(ValueError, match="load 0"):
        C.run_cuda(desc, consts, F32, torch.cuda.current_device(), 0)
    torch.cuda.synchronize()  # the context is still healthy


def _gpu_mem_gib():
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if HAVE_CUDA and EMU is None else 0


@real_gpu
@pytest.mark.skipif(_gpu_mem_gib() < 12, reason="needs a GPU with >= 12 GiB")
def test_cuda_more_than_2_31_elements():
    n = (1 << 31) + 5
    one = torch.ones(1, dtype=torch.float32, device="cuda").expand(n)  # stride 0: no memory
    # full sum, max/min of iota: coordinates beyond 2^31 are right
    s = torch.empty((), dtype=torch.float64, device="cuda")
    mx = torch.empty((), dtype=torch.float64, device="cuda")
    mn = torch.empty((), dtype=torch.float64, device="cuda")
    r = Region([n])
    r.store(s, r.load(one, strides=[0]), mode=SUM)
    io = r.iota(0, 1.0, 0.0)
    r.store(mx, io, mode=MAX)
    r.store(mn, io, mode=MIN)
    run_cuda(r, F64)
    assert s.item() == float(n)
    assert mx.item() == float(n - 1) and mn.item() == 0.0
    # rows over a reduced dim longer than 2^31, and an elementwise output of 2^31+5 bools
    out = torch.empty((2, 1), dtype=torch.float64, device="cuda")
    r = Region([2, (n - 1) // 2 + 3])
    r.store(out, r.op("mul", r.iota(1, 1.0, 0.0), r.iota(0, 1.0, 1.0)), mode=MAX)
    run_cuda(r, F64)
    m = float((n - 1) // 2 + 2)
    assert out.cpu().flatten().tolist() == [m, 2 * m]
    b = torch.empty(n, dtype=torch.bool, device="cuda")
    r = Region([n])
    r.store(b, r.op("eq", r.iota(0, 1.0, 0.0), r.const(float(n - 2))))
    run_cuda(r, F64)
    assert b.sum().item() == 1 and b[n - 2].item()
    del b
    torch.cuda.synchronize()


# ---- without a GPU ---------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available() or EMU is not None, reason="a CUDA device is available")
def test_run_cuda_without_a_device_raises_cleanly():
    x = torch.ones(4)
    r = Region(x.shape)
    r.store(x, r.op("neg", r.load(x)))
    desc, consts = r.pack()
    if not hasattr(C, "run_cuda"):
        return  # a build without CUDA may leave it out altogether
    if CUDA_COMPILED and C.cuda_device_count() > 0:
        pytest.skip("the CUDA runtime sees a device that torch does not")
    with pytest.raises(RuntimeError, match="CUDA"):
        C.run_cuda(desc, consts, F32, 0, 0)
    assert torch.equal(x, torch.ones(4))  # nothing ran
    # a malformed descriptor is still a ValueError
    if CUDA_COMPILED:
        with pytest.raises(ValueError):
            C.run_cuda(desc[:-1], consts, F32, 0, 0)
