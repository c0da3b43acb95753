// Capture: the per-call walk of PyTorch's autograd graph and the graph signature, in C++.
//
// Both only read node and tensor attributes through Python (no libtorch linkage), exactly as
// python/fastgrad/engine.py and graph_cache.py describe them; they live here because on small
// graphs the interpreter overhead of doing it in Python cost more than torch's whole backward.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace fg {
namespace py = pybind11;

// Numbers the tensors a call reads; the same tensor seen twice gets one number (engine._Binder
// subclasses it in Python to add __call__).
class Binder {
 public:
  py::list tensors;
  py::dict keys;
  py::object device = py::none();
  // Numbers of host scalars seen before the call's device was known (see index).
  std::vector<Py_ssize_t> pending_host;
  // The tensor objects numbered so far, each held (so that its address is not reused while the
  // binder lives) with its number and identity key: one met again (a tensor saved by several
  // nodes, a region's input saved by the forward too) skips its attribute reads.
  struct Seen {
    py::object tensor, key;
    Py_ssize_t number;
  };
  std::unordered_map<PyObject*, Seen> seen;

  // The number of tensor `t` (-1 for a tensor the compiled path cannot read: a dtype, layout or
  // device it does not handle, or another device than the call's); `key` receives the identity
  // key (data_ptr, shape, strides, dtype, requires_grad, producer id, output_nr). A 0-dim CPU
  // tensor that does not require grad (a wrapped Python number: `x * 2.0` saves one) joins a
  // CUDA call as PyTorch's kernels let it: `tensors` holds its value on the call's device.
  Py_ssize_t index(py::handle t, py::object* key = nullptr);
  // index for a tensor object not met before in this binder
  Py_ssize_t number(py::handle t, py::object* key);
  // (number, shape, strides, dtype, requires_grad), or None: how a tensor enters a signature.
  py::object record(py::handle t);
};

// The nodes on a path from the outputs to an input, consumers first (engine.run's view of it).
struct Graph {
  py::list order;       // nodes, consumers before producers
  py::dict leaf_nodes;  // id(leaf tensor) -> its AccumulateGrad node
  py::list roots;       // the output nodes (alive while their addresses are keys below)
  // A hash of the classes of `order`'s nodes, in order: graphs that differ only in shapes or
  // saved values share it (churn.py keys its records on it; a collision only misleads them).
  uint64_t structure = 0;
  // Keyed by the node objects, alive while `held` holds the next_functions tuples naming them.
  std::unordered_map<PyObject*, bool> need;        // node -> whether it leads to an input
  std::unordered_map<PyObject*, PyObject*> edges;  // node -> its next_functions tuple
  std::vector<py::object> held;

  bool runs(PyObject* fn) const;  // some edge leads to an input (the sweep calls fn)
  // The same facts as dicts keyed by id(node), for the Python sweep (engine.run). Made on first
  // use: a call that runs its cached plan in C++ never reads them, and building them cost
  // a third of the walk (an int object per node and two dict insertions).
  py::dict needed() const;  // id(node) -> whether it leads to an input
  py::dict nexts() const;   // id(node) -> node.next_functions

 private:
  mutable py::object needed_, nexts_;
};

// Walks from `out_nodes`; inputs are nodes (ids in `input_ids`) or leaf tensors (ids in
// `leaf_ids`), found through their AccumulateGrad nodes (class `acc_cls`).
Graph collect(const py::list& out_nodes, const py::set& input_ids, const py::set& leaf_ids,
              py::handle acc_cls);

// What graph_cache.signature documents: (key or None when not cacheable, whether a node the
// sweep runs holds saved tensors and was freed by an earlier call). `spec_fn(cls, fn)` gives
// (lowerable, is a region node, saved attribute names, holds saved tensors, (raw attribute
// name, attribute name) of each saved tensor) once per class;
// `hooks_fn(fn)` (None: no hooks anywhere) lists a node's tensor hooks; `tie_policy`
// (plan.RECOMPUTE: device type -> on) says on which devices a call ties saved tensors to
// their producers.
py::tuple signature(const Graph& g, py::handle out_edges, py::handle grad_tensors,
                    py::handle in_edges, Binder& bind, bool create_graph,
                    py::handle spec_fn, py::handle hooks_fn, py::handle freed_key,
                    py::handle tie_policy);

// The type of torch.device `dev` ("cpu", "cuda"), read once per device object.
py::object device_type(py::handle dev);

// Called once at import: the dtype -> code dict, torch.strided, the device types the compiled
// path runs on, torch.Tensor, and `to_device(t, device)`, which puts a host scalar (see
// Binder::index) on a device.
void capture_setup(py::dict dtype_codes, py::object strided, py::tuple device_types,
                   py::object tensor_cls, py::object to_device);

}  // namespace fg
