// The repeated call in C++: fastgrad.grad on a graph whose signature is cached, from the call's
// arguments to its results, without the Python between the steps.
//
// api.grad, engine.hit and runtime.execute take such a call through about fifteen Python
// functions around the C++ walk, signature and Executor; on a small graph (softmax over 1e3
// floats) that Python was a third of the call. repeat_call takes the same steps with the same
// checks and declines whatever needs more than the cached plan's Executor: the Python path then
// runs the call as before, from the walk and signature made here when there is one.
#pragma once

#include <pybind11/pybind11.h>

namespace fg {
namespace py = pybind11;

// A call of api.grad with only_inputs, neither is_grads_batched nor materialize_grads:
//   (results, None)  it ran: a tuple of tensors, as torch.autograd.grad returns;
//   (None, walk)     it was walked and signed, and engine.hit takes it on from there:
//                    walk = (out_edges, grad_tensors, given in_edges, in_edges, graph, binder,
//                    key, freed), what engine._capture makes;
//   None             not walked: a call that is not plain (call_args.h), a churn record sending
//                    calls to PyTorch unsigned, or an input its outputs do not reach.
// It runs only when the entry's plan needs nothing from Python but its run: no fallback node
// to replay, no churn record to tell, an Executor for this device and layout (see engine.hit
// and runtime.execute, which it mirrors); under create_graph the plan runs as one autograd
// Function, through runtime.execute (blocks.py).
py::object repeat_call(py::handle outputs, py::handle inputs, py::handle grad_outputs,
                       py::handle retain_graph, bool create_graph);

// Called once at import (api.py) with what engine.hit reads: the signature cache
// (graph_cache._ENTRIES), the binder class (engine._Binder), a function giving the leaf node
// class, graph_cache._spec, lowering._FREED, plan.RECOMPUTE, engine's three freeing hooks
// (_refuse_freed, _drop_saved, _refuse_unpack), hooks._STATE and hooks.tensor_hooks,
// churn._WAITING, and the runtime module (CUDA_EXECUTOR, execute, _compile_due: read on each
// call, as Python reads them).
void repeat_setup(py::dict entries, py::object binder_cls, py::object acc_cls_fn,
                  py::object spec_fn, py::object freed_key, py::dict tie_policy,
                  py::object refuse, py::object pack, py::object unpack, py::dict hooks_state,
                  py::object tensor_hooks, py::list churn_waiting, py::object runtime);

}  // namespace fg
