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
//                    key, freed, churn record or None), what engine._capture makes;
//   (None, None)     PyTorch runs it unsigned: its structure's churn record sends it there
//                    (churn.Routed), saved-tensor hooks packed a tensor it would read
//                    (saved_tensors.h), or a node has hooks (hooks.node_hooks_in);
//   None             not walked: a call that is not plain (call_args.h).
// It runs only when the entry's plan needs nothing from Python but its run: no fallback node
// to replay, no churn record to tell, an Executor for this device and layout (see engine.hit
// and runtime.execute, which it mirrors); under create_graph the plan runs as one autograd
// Function, through runtime.execute (blocks.py).
py::object repeat_call(py::handle outputs, py::handle inputs, py::handle grad_outputs,
                       py::handle retain_graph, bool create_graph);

// Called once at import (api.py) with the modules whose objects the Python path reads:
// engine, graph_cache, runtime, hooks, churn, node_view and plan. repeat_call reads their
// attributes (_ENTRIES, _Binder, FREED, RECOMPUTE, _WAITING, ...) on each use, as Python does.
void repeat_setup(py::module_ engine, py::module_ graph_cache, py::module_ runtime,
                  py::module_ hooks, py::module_ churn, py::module_ node_view, py::module_ plan);

}  // namespace fg
