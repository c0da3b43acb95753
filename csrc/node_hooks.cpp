// See node_hooks.h.
#include "node_hooks.h"

#include "node_spec.h"
#include "py_calls.h"

namespace fg {

bool node_hooks_in(const py::list& order, py::handle probe, py::handle count) {
  static PyObject* key = py_intern("fastgrad_node_hooks");
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(order.ptr()); i < n; ++i) {
    py::handle fn = PyList_GET_ITEM(order.ptr(), i);
    if (!PyCallable_Check(fn.ptr())) continue;
    const py::object md = metadata_of(fn);
    py::object kept;
    if (!md.is_none()) {
      PyObject* hit = PyDict_GetItemWithError(md.ptr(), key);
      if (!hit && PyErr_Occurred()) throw py::error_already_set();
      if (hit && PyTuple_Check(hit) && PyTuple_GET_SIZE(hit) == 2 &&
          py_equal(PyTuple_GET_ITEM(hit, 0), count))
        kept = py::reinterpret_borrow<py::object>(hit);
    }
    if (!kept) {
      kept = py::make_tuple(count, probe(fn));
      if (!md.is_none() && PyDict_SetItem(md.ptr(), key, kept.ptr()) < 0)
        throw py::error_already_set();
    }
    for (auto d : py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(kept.ptr(), 1))) {
      const Py_ssize_t len = PyObject_Length(d.ptr());
      if (len < 0) throw py::error_already_set();
      if (len > 0) return true;
    }
  }
  return false;
}

}  // namespace fg
