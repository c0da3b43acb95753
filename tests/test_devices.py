"""Calls that mix devices (CPU and CUDA).

fastgrad must behave exactly as torch.autograd.grad: where torch rejects the
call (a grad_output on another device than its output, an input that is not in
the graph because it lives on the other device), fastgrad raises the same
exception type with the same message (compared with torch's live error, never a
copied string); where torch accepts it (0-d grad_outputs are moved to the
output's device; graphs that cross devices through ``.to()``; a 0-d CPU tensor
in an op with CUDA tensors), fastgrad returns the same results on the same
devices.  Native execution is not asserted here: only behaviour.

Every case needs a GPU and skips (with the reason) where there is none or
fastgrad was built without CUDA.
"""

import pytest
import torch

from conftest import FAST_GRAD, TORCH_GRAD, assert_same, assert_same_error, device_skip_reason

CUDA = "cuda"

pytestmark = pytest.mark.skipif(device_skip_reason(CUDA) is not None,
                                reason=str(device_skip_reason(CUDA)))


def _t(shape, device, seed=0, dtype=torch.float64, requires_grad=False):
    """Deterministic values drawn on the CPU, then moved to ``device`` (a fresh leaf)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


# Each builder makes a fresh graph and returns (args, kwargs) for a grad call; it is
# called once per engine, so neither engine sees the other's graph.


def _cpu_out_cuda_go():
    x = _t((3, 4), "cpu", requires_grad=True)
    return (x.exp(), x), dict(grad_outputs=_t((3, 4), CUDA, 1))


def _cuda_out_cpu_go():
    x = _t((3, 4), CUDA, requires_grad=True)
    return (x.exp(), x), dict(grad_outputs=_t((3, 4), "cpu", 1))


def _cuda_out_cpu_go_create_graph():
    x = _t((3, 4), CUDA, requires_grad=True)
    return (torch.sin(x) * x, x), dict(grad_outputs=_t((3, 4), "cpu", 1), create_graph=True)


def _cpu_out_cuda_go_create_graph():
    x = _t((3, 4), "cpu", requires_grad=True)
    return (torch.sin(x) * x, x), dict(grad_outputs=_t((3, 4), CUDA, 1), create_graph=True)


def _two_outputs_second_go_wrong_device():
    x = _t((3, 4), CUDA, requires_grad=True)
    y = _t((4,), "cpu", 2, requires_grad=True)
    outs = (torch.tanh(x), torch.exp(y))
    gos = (_t((3, 4), CUDA, 3), _t((4,), CUDA, 4))  # the second belongs on the CPU
    return (outs, (x, y)), dict(grad_outputs=gos)


def _two_outputs_first_go_wrong_device():
    x = _t((3, 4), CUDA, requires_grad=True)
    y = _t((4,), "cpu", 2, requires_grad=True)
    outs = (torch.tanh(x), torch.exp(y))
    gos = (_t((3, 4), "cpu", 3), _t((4,), "cpu", 4))  # the first belongs on CUDA
    return (outs, (x, y)), dict(grad_outputs=gos)


def _cuda_out_cpu_input_unused():
    x = _t((3, 4), CUDA, requires_grad=True)
    z = _t((3, 4), "cpu", 5, requires_grad=True)  # on the other device, not in the graph
    return (x.exp().sum(), z), {}


def _cpu_out_cuda_input_unused():
    x = _t((3, 4), "cpu", requires_grad=True)
    z = _t((3, 4), CUDA, 5, requires_grad=True)
    return (x.exp().sum(), (x, z)), {}


def _wrong_device_and_shape_go():
    x = _t((3, 4), CUDA, requires_grad=True)
    return (x.exp(), x), dict(grad_outputs=_t((4, 3), "cpu", 1))


def _wrong_device_float32_go():
    x = _t((3, 4), CUDA, requires_grad=True)
    return (x.exp(), x), dict(grad_outputs=_t((3, 4), "cpu", 1, dtype=torch.float32))


def _batched_go_wrong_device():
    x = _t((3, 4), CUDA, requires_grad=True)
    return (x.exp(), x), dict(grad_outputs=_t((2, 3, 4), "cpu", 1), is_grads_batched=True)


def _batched_go_wrong_device_cpu_out():
    x = _t((3, 4), "cpu", requires_grad=True)
    return (torch.sin(x), x), dict(grad_outputs=_t((2, 3, 4), CUDA, 1), is_grads_batched=True)


MISUSE = {
    "cpu_output-cuda_grad_output": _cpu_out_cuda_go,
    "cuda_output-cpu_grad_output": _cuda_out_cpu_go,
    "cuda_output-cpu_grad_output-create_graph": _cuda_out_cpu_go_create_graph,
    "cpu_output-cuda_grad_output-create_graph": _cpu_out_cuda_go_create_graph,
    "two_outputs-second_grad_output_on_cuda": _two_outputs_second_go_wrong_device,
    "two_outputs-first_grad_output_on_cpu": _two_outputs_first_go_wrong_device,
    "cuda_output-cpu_input_not_in_graph": _cuda_out_cpu_input_unused,
    "cpu_output-cuda_input_not_in_graph": _cpu_out_cuda_input_unused,
    "cuda_output-cpu_grad_output_wrong_shape": _wrong_device_and_shape_go,
    "cuda_float64_output-cpu_float32_grad_output": _wrong_device_float32_go,
    "batched-cuda_output-cpu_grad_outputs": _batched_go_wrong_device,
    "batched-cpu_output-cuda_grad_outputs": _batched_go_wrong_device_cpu_out,
}


@pytest.mark.parametrize("build", MISUSE.values(), ids=list(MISUSE))
def test_mixed_device_misuse_raises_torch_error(build):
    def call(engine):
        args, kwargs = build()
        return lambda: engine(*args, **kwargs)

    assert_same_error(call(TORCH_GRAD), call(FAST_GRAD))


# ---------------------------------------------------------------- accepted by torch


def _cuda_0d_out_cpu_0d_go():
    # torch moves a 0-d grad_output to its output's device
    x = _t((3, 4), CUDA, requires_grad=True)
    return (torch.exp(x).sum(), x), dict(grad_outputs=torch.tensor(1.5, dtype=torch.float64))


def _cpu_0d_out_cuda_0d_go():
    x = _t((3, 4), "cpu", requires_grad=True)
    go = torch.tensor(-0.5, dtype=torch.float64, device=CUDA)
    return (torch.sin(x).sum(), x), dict(grad_outputs=go)


def _cuda_0d_out_cpu_0d_go_create_graph():
    x = _t((3, 4), CUDA, requires_grad=True)
    return ((torch.tanh(x) * x).sum(), x), dict(
        grad_outputs=torch.tensor(2.0, dtype=torch.float64), create_graph=True)


def _cpu_leaf_to_cuda():
    # the graph crosses devices: gradient flows back to the CPU leaf
    x = _t((3, 4), "cpu", requires_grad=True)
    y = torch.exp(x.to(CUDA) * 0.5).sum(1)
    return (y, x), dict(grad_outputs=_t((3,), CUDA, 1))


def _cuda_leaf_to_cpu():
    x = _t((3, 4), CUDA, requires_grad=True)
    y = torch.sin(x.cpu()) * x.detach().cpu()
    return (y, x), dict(grad_outputs=_t((3, 4), "cpu", 1))


def _cpu_scalar_times_cuda():
    # a 0-d CPU tensor may take part in a CUDA op; its gradient is 0-d on the CPU
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x = _t((3, 4), CUDA, requires_grad=True)
    y = torch.tanh(s * x + s)
    return (y, (s, x)), dict(grad_outputs=_t((3, 4), CUDA, 1))


def _both_devices_one_call():
    x = _t((3, 4), CUDA, requires_grad=True)
    y = _t((4,), "cpu", 2, requires_grad=True)
    outs = (torch.tanh(x) * 2, torch.exp(y).sum())
    gos = (_t((3, 4), CUDA, 3), _t((), "cpu", 4))
    return (outs, (x, y)), dict(grad_outputs=gos)


def _cuda_input_unused_allowed():
    x = _t((3, 4), "cpu", requires_grad=True)
    z = _t((3, 4), CUDA, 5, requires_grad=True)
    return (x.exp().sum(), (x, z)), dict(allow_unused=True)


def _cuda_input_unused_materialized():
    x = _t((3, 4), "cpu", requires_grad=True)
    z = _t((3, 4), CUDA, 5, requires_grad=True)
    return (x.exp().sum(), (x, z)), dict(materialize_grads=True)


ACCEPTED = {
    "cuda_0d_output-cpu_0d_grad_output": _cuda_0d_out_cpu_0d_go,
    "cpu_0d_output-cuda_0d_grad_output": _cpu_0d_out_cuda_0d_go,
    "cuda_0d_output-cpu_0d_grad_output-create_graph": _cuda_0d_out_cpu_0d_go_create_graph,
    "cpu_leaf_to_cuda": _cpu_leaf_to_cuda,
    "cuda_leaf_to_cpu": _cuda_leaf_to_cpu,
    "cpu_scalar_times_cuda": _cpu_scalar_times_cuda,
    "cpu_and_cuda_outputs_one_call": _both_devices_one_call,
    "cuda_input_unused-allow_unused": _cuda_input_unused_allowed,
    "cuda_input_unused-materialize_grads": _cuda_input_unused_materialized,
}


@pytest.mark.parametrize("build", ACCEPTED.values(), ids=list(ACCEPTED))
def test_mixed_device_accepted_like_torch(build):
    def call(engine):
        args, kwargs = build()
        res = engine(*args, **kwargs)
        return res, kwargs.get("create_graph", False), args[1]

    ref, create, _ = call(TORCH_GRAD)
    got, _, _ = call(FAST_GRAD)
    assert_same(got, ref, what="result")  # values, dtypes and devices
    for i, (g, r) in enumerate(zip(got, ref)):
        if r is not None:
            assert g.device == r.device, f"result[{i}] on {g.device}, torch gives {r.device}"
            if create:
                assert g.requires_grad == r.requires_grad, f"result[{i}] requires_grad"
    if create:
        # and the results differentiate again like torch's (on their devices)
        def again(engine):
            (out, x), kwargs = build()
            (g,) = engine(out, x, create_graph=True, **{k: v for k, v in kwargs.items()
                                                        if k != "create_graph"})
            return engine((g * g).sum(), x)

        assert_same(again(FAST_GRAD), again(TORCH_GRAD), what="second order")
