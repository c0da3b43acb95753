// ir.topo in C++: the IR nodes reachable from some roots, in post-order.
//
// Lowering, derivation, planning and create_graph blocks walk small IR DAGs tens of times per
// graph they meet (82 walks of about 9 nodes for a PINN step's two calls): in Python the walks
// took 12% of a call that plans (docs/performance-history-nov27.md, "Points in a few counts,
// and planning anew"). IR nodes are Python objects (ir.Node); this reads their `args` and
// `known` slots through the attribute protocol.
#pragma once

#include <pybind11/pybind11.h>

namespace fg {
namespace py = pybind11;

// roots: a list or tuple of ir.Node or None; stop: None or a callable(node) -> bool; stop_ids:
// None or a set or dict of node ids (id(node)). A node for which `stop_known` and its `known`
// is not None, or whose id is in stop_ids, or stop(node) is true, is listed but nothing below
// it is walked. Arguments come before their users, roots in order, each node once.
py::list ir_topo(py::handle roots, py::handle stop, bool stop_known, py::handle stop_ids);

}  // namespace fg
