// See saved_tensors.h.
#include "saved_tensors.h"

#include <string>

#include "node_spec.h"
#include "py_calls.h"

namespace fg {
namespace {

// Calls `visit(item)` for each SavedTensor node fn holds (a list attribute, such as an index
// list's, gives each of its items) until one returns false; returns whether none did.
template <class Visit>
bool each_raw_saved(py::handle fn, const Spec& spec, Visit visit) {
  for (const auto& names : spec.raw) {
    py::object raw = py_attr(fn, names.first.ptr());
    if (PyTuple_Check(raw.ptr()) || PyList_Check(raw.ptr())) {
      const py::object items = py_fast(raw, "raw saved tensors");  // (a list kept alive)
      for (Py_ssize_t i = 0, n = PySequence_Fast_GET_SIZE(items.ptr()); i < n; ++i)
        if (!visit(py::handle(PySequence_Fast_GET_ITEM(items.ptr(), i)))) return false;
    } else if (!visit(raw)) {
      return false;
    }
  }
  return true;
}

// Frees what node fn saved, as PyTorch's engine does after running it without retain_graph:
// each saved tensor gets saved-tensor hooks whose pack drops the tensor (PyTorch releases its
// reference then) and whose unpack raises PyTorch's freed-graph error, so any later use of the
// node (by PyTorch's engine, by fastgrad, by `_saved_<name>`) fails as on a freed graph.
enum class Release { kFreed, kNothing, kFailed };
// kNothing: every saved tensor of the node is None (nothing to free: PyTorch lets such a node
// run again). kFailed: a saved tensor cannot take the hooks (it has saved-tensor hooks
// already); the caller then refuses the node by a pre-hook instead. A fallback node PyTorch's
// engine ran without retain_graph (engine._call_opaque) was freed by it already, and a later
// run meets PyTorch's own checks (a Python Function that saved nothing may run again): kNothing.
bool freed_by_torch(const py::error_already_set& err) {
  return std::string(err.what()).find("freed") != std::string::npos;
}

Release release_saved(py::handle fn, const Spec& spec, py::handle reg, py::handle pack,
                      py::handle unpack) {
  bool any = false, all;
  try {
    all = each_raw_saved(fn, spec, [&](py::handle item) {
      PyObject* args[] = {item.ptr(), pack.ptr(), unpack.ptr()};
      PyObject* r = PyObject_Vectorcall(reg.ptr(), args, 3, nullptr);
      if (r) {
        Py_DECREF(r);
        any = true;
        return true;
      }
      // PyTorch refuses hooks on a saved value that is None ("... with value None is
      // forbidden": `self` of `x * 3.0`, an index list's empty slot): nothing to free there.
      // Its message is the only way to tell: reading the value would run the user's unpack
      // hook, if any.
      py::error_already_set err;
      return freed_by_torch(err) || std::string(err.what()).find("None") != std::string::npos;
    });
  } catch (py::error_already_set& err) {  // (a Python Function's raw saved tensors, freed)
    if (!freed_by_torch(err)) throw;
    return Release::kNothing;
  }
  if (!all) return Release::kFailed;
  return any ? Release::kFreed : Release::kNothing;
}

}  // namespace

void mark_freed(const Graph& g, py::handle freed_key, py::handle refuse, py::handle spec_fn,
                py::handle reg, py::handle pack, py::handle unpack) {
  static PyObject* register_prehook = py_intern("register_prehook");
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(g.order.ptr()); i < n; ++i) {
    py::handle fn = PyList_GET_ITEM(g.order.ptr(), i);
    if (!g.runs(fn.ptr())) continue;
    // (a node without metadata cannot be marked, as lowering.mark_freed did)
    const py::object md = metadata_of(fn);
    if (md.is_none() || is_freed(md, freed_key)) continue;
    Spec& spec = spec_of(fn, spec_fn);
    // (a node PyTorch would release otherwise than by its saved tensors is refused by the
    // pre-hook, which PyTorch's engine runs too)
    const Release rel = spec.holds_saved ? release_saved(fn, spec, reg, pack, unpack)
                        : spec.releases  ? Release::kFailed
                                         : Release::kFreed;
    if (rel == Release::kNothing) continue;  // nothing saved: it may run again, as in PyTorch
    if (PyDict_SetItem(md.ptr(), freed_key.ptr(), Py_True) < 0) throw py::error_already_set();
    if (rel == Release::kFailed) {
      PyObject* r = PyObject_CallMethodOneArg(fn.ptr(), register_prehook, refuse.ptr());
      if (!r) throw py::error_already_set();
      Py_DECREF(r);
    }
  }
}

bool saved_hooks_in(const Graph& g, py::handle spec_fn) {
  static PyObject* unpack_hook = py_intern("unpack_hook");
  for (Py_ssize_t i = 0, n = PyList_GET_SIZE(g.order.ptr()); i < n; ++i) {
    py::handle fn = PyList_GET_ITEM(g.order.ptr(), i);
    const Spec& spec = spec_of(fn, spec_fn);
    if (!spec.lowerable || !spec.holds_saved) continue;
    const bool none = each_raw_saved(fn, spec, [&](py::handle item) {
      if (item.is_none()) return true;
      PyObject* h = PyObject_GetAttr(item.ptr(), unpack_hook);
      if (!h) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
        PyErr_Clear();
        return false;  // (a torch that does not show it)
      }
      const bool hooked = h != Py_None;
      Py_DECREF(h);
      return !hooked;
    });
    if (!none) return true;
  }
  return false;
}

}  // namespace fg
