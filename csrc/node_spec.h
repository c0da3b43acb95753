// What capture.cpp and saved_tensors.cpp both read of an autograd node: its class's saved
// attributes (asked of Python once per class) and its `metadata` dict.
#pragma once

#include <pybind11/pybind11.h>

#include <utility>
#include <vector>

namespace fg {
namespace py = pybind11;

struct Spec {
  py::object cls;  // keeps the class alive while its address is a key
  bool lowerable, region, holds_saved;
  // PyTorch's engine releases something of the node besides saved tensors after running it
  // without retain_graph (CopySlices: the node it wraps), after which running it raises
  bool releases = false;
  std::vector<py::object> saved;  // attribute names
  // (_raw_saved_<name>, _saved_<name>) of each saved tensor (mark_freed, saved_hooks_in)
  std::vector<std::pair<py::object, py::object>> raw;
  // `saved` split: the tensors (those with a raw form) and the other values, which a node
  // fixes when PyTorch creates it (node_values keeps them); values_fixed turns false for good
  // if one of the others ever is a tensor (then every attribute is read on each call).
  std::vector<py::object> saved_tensors, saved_values;
  bool values_fixed = true;
};

// The Spec of fn's class; `spec_fn(cls, fn)` (graph_cache._spec) describes a class met first.
Spec& spec_of(py::handle fn, py::handle spec_fn);

// A node's `metadata` dict, or None (a node without one: as node_view.is_freed, never freed).
py::object metadata_of(py::handle fn);

// Whether metadata dict `md` (or None) marks its node consumed by an earlier call.
bool is_freed(py::handle md, py::handle freed_key);

}  // namespace fg
