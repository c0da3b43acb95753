// Whether a node of a call's walk has hooks of its own (grad_fn.register_prehook /
// register_hook), which a node fastgrad lowers or calls directly does not run (hooks.py says how
// a node is asked). In C++ because once anything in the process registered a node hook
// (torch.compile does) every call asks every node.
#pragma once

#include <pybind11/pybind11.h>

namespace fg {
namespace py = pybind11;

// Whether a C++ node of `order` (Python Function nodes run through PyTorch's engine, hooks and
// all) holds a non-empty hook dict. `probe(fn)` gives a node's hook dicts; what it gave is kept
// in the node's `metadata` with `count` (registrations so far), and asked again only when the
// count has changed since.
bool node_hooks_in(const py::list& order, py::handle probe, py::handle count);

}  // namespace fg
