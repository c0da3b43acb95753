#include "ir_topo.h"

#include <unordered_set>
#include <utility>
#include <vector>

#include "py_calls.h"

namespace fg {

py::list ir_topo(py::handle roots, py::handle stop, bool stop_known, py::handle stop_ids) {
  static PyObject* const args_name = py_intern("args");
  static PyObject* const known_name = py_intern("known");
  const py::object rs = py_fast(roots, "ir.topo: roots must be a list or tuple");
  const bool has_stop = !stop.is_none(), has_ids = !stop_ids.is_none();
  if (has_ids && !PyAnySet_Check(stop_ids.ptr()) && !PyDict_Check(stop_ids.ptr()))
    throw py::type_error("ir.topo: stop_ids must be a set or a dict");
  // Nodes are borrowed: each is held by a root or by the args tuple of a node above it, and
  // nodes are immutable, so none is freed during the walk (`stop` may build new ones only).
  std::unordered_set<PyObject*> seen;
  std::vector<std::pair<PyObject*, bool>> stack;  // (node, its arguments already listed)
  py::list order;
  for (Py_ssize_t i = PySequence_Fast_GET_SIZE(rs.ptr()); i-- > 0;) {
    PyObject* r = PySequence_Fast_GET_ITEM(rs.ptr(), i);
    if (r != Py_None) stack.emplace_back(r, false);
  }
  while (!stack.empty()) {
    const auto [n, done] = stack.back();
    stack.pop_back();
    if (done) {
      if (PyList_Append(order.ptr(), n) < 0) throw py::error_already_set();
      continue;
    }
    if (!seen.insert(n).second) continue;
    stack.emplace_back(n, true);
    if (stop_known && !py_attr(n, known_name).is_none()) continue;
    if (has_ids) {
      const int in = PySequence_Contains(stop_ids.ptr(), py_id(n).ptr());
      if (in < 0) throw py::error_already_set();
      if (in) continue;
    }
    if (has_stop && py_truthy(stop(py::handle(n)))) continue;
    const py::object args = py_attr(n, args_name);
    if (!PyTuple_Check(args.ptr())) throw py::type_error("ir.topo: a node's args must be a tuple");
    for (Py_ssize_t i = PyTuple_GET_SIZE(args.ptr()); i-- > 0;) {
      PyObject* a = PyTuple_GET_ITEM(args.ptr(), i);
      if (!seen.count(a)) stack.emplace_back(a, false);
    }
  }
  return order;
}

}  // namespace fg
