"""Constants read as scalars by the CPU interpreter (csrc/vm_cpu_plan.h, plan_direct_reads): a
constant read only as one operand of binary ops is not filled into a register. Results must be
those of the same op on a filled constant, in either operand position, for every binary op and
special value; a constant that something else also reads stays a register."""
import math

import pytest
import torch

from test_vm import BINARY, COMPUTE, SUM, Region, check, inputs

CONSTS = [2.5, -0.0, math.nan, math.inf, -3.0]


def _c(v, dtype):
    return torch.tensor(v, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_binary_with_a_constant_operand(name, dtype, compute, nthreads):
    # long enough for several blocks and both threads
    x = inputs(dtype, n=70000, seed=5)
    for v in CONSTS:
        for first in (True, False):
            out = torch.empty_like(x)
            r = Region(x.shape)
            a = r.load(x)
            c = r.const(v)
            r.store(out, r.op(name, c, a) if first else r.op(name, a, c))
            r.run(compute, nthreads)
            cv = _c(v, dtype)
            ref = BINARY[name](cv.expand_as(x), x) if first else BINARY[name](x, cv.expand_as(x))
            check(out, ref)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_constant_with_other_readers(dtype, compute):
    # one constant read by a binary op, by a `where` and by a store: it stays a register
    x = inputs(dtype, n=5000, seed=6)
    out1, out2, out3 = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    r = Region(x.shape)
    a = r.load(x)
    c = r.const(1.5)
    r.store(out1, r.op("mul", a, c))
    r.store(out2, r.op("where", r.op("gt", a, r.const(0.0)), c, a))
    r.store(out3, c)
    r.run(compute, 2)
    check(out1, x * 1.5)
    check(out2, torch.where(x > 0, _c(1.5, dtype), x))
    check(out3, torch.full_like(x, 1.5))


@pytest.mark.parametrize("dtype,compute", COMPUTE)
@pytest.mark.parametrize("first", [True, False])
def test_product_with_a_constant_summed(dtype, compute, first):
    # a product read only by a sum store is normally summed without being written (seg_dot,
    # which reads both operands' registers); with a constant operand it must not be
    x = torch.randn(4, 3000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = x.to(dtype)
    total = torch.zeros(4, 1, dtype=dtype)
    r = Region(x.shape)
    a, c = r.load(x), r.const(-2.0)
    r.store(total, r.op("mul", c, a) if first else r.op("mul", a, c), mode=SUM, strides=[1, 0])
    r.run(compute, 2)
    ref = (-2.0 * x.double()).sum(1, keepdim=True).to(dtype)
    torch.testing.assert_close(total, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-4 if dtype == torch.float32 else 1e-9)
