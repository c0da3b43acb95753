"""The benchmark's references in csrc/floor.cpp: the hand-fused C++ loop of the floor case
(_C.hand_fused_sin_exp_grad), the VJP of (sin(x) * exp(x)).sum() against torch, special values
included, and its argument checks; the streaming-store copy behind the floor's bandwidth
(_C.stream_copy)."""
import math

import pytest
import torch

C = pytest.importorskip("fastgrad._C")


@pytest.mark.parametrize("dtype,code", [(torch.float32, 0), (torch.float64, 1)])
@pytest.mark.parametrize("n,nthreads", [(0, 1), (1, 1), (1003, 2), (100_003, 1), (100_003, 2), (100_003, 3)])
def test_hand_fused_sin_exp_grad(dtype, code, n, nthreads):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dtype=dtype, generator=g) * 4
    if n > 20:
        x[:6] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 89.0], dtype=dtype)
    out = torch.full_like(x, 7.0)
    C.hand_fused_sin_exp_grad(x.data_ptr(), out.data_ptr(), n, code, nthreads)
    ref = torch.cos(x) * torch.exp(x) + torch.sin(x) * torch.exp(x)
    assert torch.equal(out.isnan(), ref.isnan())
    inf = ref.isinf()
    assert torch.equal(out[inf], ref[inf])
    # cos + sin cancels near -pi/4: bound the error by the terms' size, not the result's
    fin = ref.isfinite()
    x64 = x[fin].double()
    scale = x64.exp() * (x64.cos().abs() + x64.sin().abs())
    ref64 = x64.cos() * x64.exp() + x64.sin() * x64.exp()
    eps = 4e-6 if dtype == torch.float32 else 1e-14
    assert ((out[fin].double() - ref64).abs() <= eps * scale + 1e-300).all()


def test_hand_fused_sin_exp_grad_arguments():
    x = torch.ones(4)
    out = torch.empty(4)
    for args in [(4, 2, 1), (4, -1, 1), (-1, 0, 1), (4, 0, 0)]:
        with pytest.raises(ValueError):
            C.hand_fused_sin_exp_grad(x.data_ptr(), out.data_ptr(), *args)
    with pytest.raises(ValueError):
        C.hand_fused_sin_exp_grad(0, out.data_ptr(), 4, 0, 1)
    C.hand_fused_sin_exp_grad(0, 0, 0, 0, 1)  # nothing to do


def test_stream_copy_copies_and_refuses_unaligned_buffers():
    # the second copy the bandwidth is measured with: exact over aligned whole lines, on any
    # thread count, and a ValueError instead of a fault for what it cannot stream
    gen = torch.Generator().manual_seed(5)
    src = torch.rand(3 * 65536 + 16, generator=gen)  # (four chunks of 4096 lines)
    for nthreads in (1, 2):
        dst = torch.full_like(src, float("nan"))
        C.stream_copy(src.data_ptr(), dst.data_ptr(), src.numel() * 4, nthreads)
        assert torch.equal(dst, src)
    dst = torch.empty_like(src)
    s, d = src.data_ptr(), dst.data_ptr()
    for args in ((s + 4, d, 64, 1), (s, d + 4, 64, 1), (s, d, 60, 1), (s, d, 64, 0)):
        with pytest.raises(ValueError):
            C.stream_copy(*args)
