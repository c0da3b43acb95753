// The bytes key of a graph signature (see signature_key.h).
#include "signature_key.h"

#include <cstring>

namespace fg {
namespace {

// object -> number. Heap-held and never destroyed (it may outlive the interpreter).
PyObject* g_interned = nullptr;
int64_t g_next = 0;  // never reset: a number is never reused
int64_t g_generation = 0;

PyObject* table() {
  if (!g_interned) {
    g_interned = PyDict_New();
    if (!g_interned) throw py::error_already_set();
  }
  return g_interned;
}

// The number of `o`, or -1 (no error set) when it is unhashable.
int64_t intern(PyObject* o) {
  PyObject* t = table();
  PyObject* hit = PyDict_GetItemWithError(t, o);
  if (hit) return PyLong_AsLongLong(hit);
  if (PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
    PyErr_Clear();  // unhashable
    return -1;
  }
  const int64_t n = g_next++;
  py::object num = py::reinterpret_steal<py::object>(PyLong_FromLongLong(n));
  if (!num || PyDict_SetItem(t, o, num.ptr()) < 0) throw py::error_already_set();
  return n;
}

}  // namespace

void KeyWriter::int_of(py::handle o) {
  const long long v = PyLong_AsLongLong(o.ptr());
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  i64(v);
}

bool KeyWriter::ints(py::handle seq) {
  PyObject* s = seq.ptr();
  if (PyTuple_Check(s) || PyList_Check(s)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(s);
    PyObject** items = PySequence_Fast_ITEMS(s);
    const size_t start = buf_.size();
    tag('t');
    i64(n);
    Py_ssize_t i = 0;
    for (; i < n; ++i) {
      if (!PyLong_CheckExact(items[i])) break;
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
      if (overflow) break;
      i64(v);
    }
    if (i == n) return true;
    buf_.resize(start);  // not all ints: the whole as an object
  }
  tag('o');
  py::object t = PyList_Check(s) ? py::reinterpret_steal<py::object>(PyList_AsTuple(s))
                                 : py::reinterpret_borrow<py::object>(seq);
  if (!t) throw py::error_already_set();
  return obj(t);
}

bool KeyWriter::obj(py::handle o) {
  const int64_t n = intern(o.ptr());
  if (n < 0) return false;
  i64(n);
  return true;
}

bool KeyWriter::value(py::handle v) {
  PyObject* o = v.ptr();
  if (o == Py_None) {
    tag('N');
    return true;
  }
  if (PyBool_Check(o)) {
    tag(o == Py_True ? 'T' : 'F');
    return true;
  }
  if (PyLong_CheckExact(o)) {
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow) {
      tag('i');
      i64(x);
      return true;
    }
  } else if (PyFloat_CheckExact(o)) {
    const double d = PyFloat_AS_DOUBLE(o);
    int64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    tag('f');
    i64(bits);
    return true;
  } else if (PyTuple_CheckExact(o) || PyList_Check(o)) {
    tag('s');
    return ints(v);
  }
  tag('v');
  py::tuple tv = py::make_tuple(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(o))), v);
  return obj(tv);
}

void clear_interned() {
  if (g_interned) PyDict_Clear(g_interned);
  ++g_generation;
}

int64_t interned_generation() { return g_generation; }

Py_ssize_t interned_count() { return g_interned ? PyDict_GET_SIZE(g_interned) : 0; }

}  // namespace fg
