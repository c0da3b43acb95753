// Small CPython calls that raise pybind11's error_already_set on failure, shared by the C++
// code that reads tensors and autograd nodes through their Python attributes (capture.cpp,
// call_args.cpp, executor.cpp, repeat_call.cpp): no libtorch.
#pragma once

#include <pybind11/pybind11.h>

namespace fg {
namespace py = pybind11;

// An interned name (for attribute and method lookups); the caller keeps it for the process.
inline PyObject* py_intern(const char* s) {
  PyObject* o = PyUnicode_InternFromString(s);
  if (!o) throw py::error_already_set();
  return o;
}

inline py::object py_attr(py::handle o, PyObject* name) {
  PyObject* r = PyObject_GetAttr(o.ptr(), name);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// o.name() or o.name(arg)
inline py::object py_call(py::handle o, PyObject* name, PyObject* arg = nullptr) {
  PyObject* r = arg ? PyObject_CallMethodOneArg(o.ptr(), name, arg) : PyObject_CallMethodNoArgs(o.ptr(), name);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// `seq` as a list or tuple (PySequence_Fast: itself when it is one), for
// PySequence_Fast_GET_SIZE / _GET_ITEM; `what` is the TypeError's message otherwise.
inline py::object py_fast(py::handle seq, const char* what) {
  PyObject* r = PySequence_Fast(seq.ptr(), what);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// id(o): the object's address as a Python int (the keys the walk's dicts use, as in Python)
inline py::object py_id(py::handle o) {
  return py::reinterpret_steal<py::object>(PyLong_FromVoidPtr(o.ptr()));
}

inline bool py_truthy(py::handle o) {
  int r = PyObject_IsTrue(o.ptr());
  if (r < 0) throw py::error_already_set();
  return r == 1;
}

inline bool py_equal(py::handle a, py::handle b) {
  int r = PyObject_RichCompareBool(a.ptr(), b.ptr(), Py_EQ);  // (identical objects: true)
  if (r < 0) throw py::error_already_set();
  return r == 1;
}

}  // namespace fg
