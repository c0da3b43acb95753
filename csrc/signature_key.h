// A graph signature's key (capture.cpp, signature), written as one bytes object.
//
// The key is looked up in a dict on every call. As nested tuples (of torch.Size, dtypes,
// devices, classes) it cost a deep hash and, on a hit, a deep comparison against the stored
// key, then the deallocation of the whole tree: on a 7-node MLP graph about a third of the
// signature's time. Bytes hash in one pass and compare with memcmp.
//
// Fields are fixed-width integers; each variable part starts with a tag byte and, where it
// varies in length, its count, so two keys are equal only if what they describe is. Objects
// that are only compared (node classes, dtypes, devices, regions, saved values other than
// numbers and int tuples) enter as their number in an intern table: equal objects get the same
// number, and a number is never given to another object, even after the table is cleared
// (clear_interned), so a stored key can never match a different graph; clearing only makes
// keys of objects seen before different (a cache miss).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace fg {
namespace py = pybind11;

class KeyWriter {
 public:
  void tag(char c) { buf_.push_back(c); }
  void i64(int64_t v) { buf_.append(reinterpret_cast<const char*>(&v), sizeof v); }
  // A Python int (an output number, an edge position): must fit in int64.
  void int_of(py::handle o);
  // A tuple (or torch.Size, or list) of Python ints as its length and values; anything else
  // (a SymInt, an int past int64) as an interned object. False: unhashable (no key).
  bool ints(py::handle seq);
  // An object compared by equality: its intern number. False: unhashable (no key).
  bool obj(py::handle o);
  // A saved non-tensor value, as the tuple key described it: None, bool, int and float by
  // value (a float by its bits: -0.0 and 0.0 differ, a finer key than ==, never a coarser
  // one), a list as the tuple of its items, anything else as (type, value) interned.
  bool value(py::handle v);
  // Bytes another KeyWriter made (a part kept for reuse).
  void raw(py::handle b) { buf_.append(PyBytes_AS_STRING(b.ptr()), PyBytes_GET_SIZE(b.ptr())); }
  py::bytes bytes() const { return py::bytes(buf_); }

 private:
  std::string buf_;
};

// Forget every interned object (graph_cache.clear: with the keys that used them).
void clear_interned();
// How many times the table was cleared: key parts kept for reuse are valid only within the
// generation that numbered them.
int64_t interned_generation();
// How many objects the intern table holds (graph_cache bounds it).
Py_ssize_t interned_count();

}  // namespace fg
