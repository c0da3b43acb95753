"""Row groups on CUDA: one compiled kernel takes each row through every region of the group
(cuda_codegen.group_source, cuda_jit.group_kernel_for, runtime.run_group_cuda).

Everywhere NVRTC is found: the group kernels of real plans (softmax, log_softmax, layer norm,
...) compile, and their regions that pass values to each other are not read through the
read-only cache. On a GPU: after jit.AFTER runs each group runs as one kernel (explain says
so) and the gradients match torch's, for the shapes test_row_groups.py runs on the CPU.
"""
import pytest
import torch

import fastgrad
from fastgrad import cuda_codegen, cuda_jit, jit
from fastgrad import plan as fplan, plan_steps
from conftest import TORCH_GRAD, assert_same, rand
from test_cuda_jit import _nvrtc_or_skip
from test_row_groups import CASES
from test_vm_cuda import real_gpu

GROUPED = ["softmax", "log_softmax", "layer_norm", "softmax_chain"]  # (amax is one region)
# shapes whose plans group rows (test_row_groups.SHAPES less the one without a group)
SHAPES = [(3001, 256), (20011, 3), (7, 130, 64), (2, 3, 5)]


def _groups():
    return [s for p in list(fplan._CACHE.values()) for s in p.steps
            if isinstance(s, plan_steps.RowGroup)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", GROUPED)
def test_group_kernels_of_real_plans_compile(name, dtype, gen):
    _nvrtc_or_skip()
    fplan.clear_plan_cache()
    x = rand((300, 40), gen, dtype=dtype).requires_grad_()
    y = CASES[name](x)
    fastgrad.grad(y, x, rand(tuple(y.shape), gen, dtype=dtype))  # (a CPU run: the packers)
    groups = _groups()
    assert groups
    for g in groups:
        packers = [next(iter(r.packers.values())) for r in g.regions]
        lays = cuda_codegen.group_layouts([cuda_codegen.layout(p.desc) for p in packers], g.dims)
        assert lays is not None and all(lay.split == len(g.dims) for lay in lays)
        src = cuda_codegen.group_source(g.regions, lays, [p.compute for p in packers])
        assert src.count("__syncwarp();") == len(g.regions) - 1
        # what one region stores and a later one loads is not __restrict__ (no .nc loads)
        restricted = src.split("fg_kernel(")[1].split(")")[0].count("__restrict__")
        params = src.split("fg_kernel(")[1].split(")")[0].count(",") + 1
        assert restricted < params, src
        _, cubin = cuda_jit.compile_cubin(src, "90")
        assert cubin[:4] == b"\x7fELF"


def test_groups_that_do_not_fit_one_kernel():
    lay = cuda_codegen.Layout([50, 9000], 1, [], [])  # few long rows: the interpreter splits them
    assert cuda_codegen.group_layouts([lay], (0,)) is None
    # few rows of many elements: the elementwise regions keep their own kernels
    assert cuda_codegen.group_layouts([cuda_codegen.Layout([1000, 4096], 1, [], [])], (0,)) is None
    assert cuda_codegen.group_layouts([cuda_codegen.Layout([10000, 4096], 1, [], [])], (0,))
    assert cuda_codegen.group_layouts([cuda_codegen.Layout([200, 4096], 1, [], [])], (0,))
    assert cuda_codegen.group_layouts([cuda_codegen.Layout([9000, 30], None, [], [])], (1,)) is None
    two = [cuda_codegen.Layout([40, 30], 1, [], []), cuda_codegen.Layout([40, 30, 2], 2, [], [])]
    assert cuda_codegen.group_layouts(two, (0,)) is None  # a reduction over other dims
    assert cuda_codegen.group_layouts([lay, None], (0,)) is None


@real_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(list(s)) for s in SHAPES])
@pytest.mark.parametrize("name", GROUPED)
def test_groups_run_as_one_kernel(name, shape, dtype, gen):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else \
        dict(rtol=1e-4, atol=1e-5, atol_scale=True)
    fn = CASES[name]
    for _ in range(jit.AFTER + 2):
        x = rand(shape, gen, dtype=dtype, device="cuda").requires_grad_()
        y = fn(x)
        go = rand(tuple(y.shape), gen, dtype=dtype, device="cuda")
        xr = x.detach().clone().requires_grad_()
        assert_same(fastgrad.grad(y, x, go, retain_graph=True), TORCH_GRAD(fn(xr), xr, go), **tol)
    report = fastgrad.explain(y, x, go)
    lines = report.regions
    groups = [ln for ln in lines if ln.startswith("row group")]
    assert groups and all(ln.endswith("one kernel, a warp per row") for ln in groups), lines
    assert all("compiled loop" in ln for ln in lines if ln.strip().startswith("region ")), lines
    assert report.kernel_launches == len(groups) + sum(not ln.startswith(" ") and
                                                       ln.startswith("region") for ln in lines)
