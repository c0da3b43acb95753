// What fastgrad does with a graph's saved tensors besides reading their values: freeing them as
// PyTorch's engine does (retain_graph=False), and asking whether saved-tensor hooks packed them.
// Both go through each node's raw saved tensors (`_raw_saved_<name>`, PyTorch's SavedTensor
// objects), which never run a hook.
#pragma once

#include <pybind11/pybind11.h>

#include "capture.h"

namespace fg {
namespace py = pybind11;

// Marks every node the sweep ran as consumed (retain_graph=False): metadata[freed_key] = True,
// and frees the saved tensors of those that hold some, as PyTorch's engine does: saved-tensor
// hooks `pack` (drops the tensor) and `unpack` (raises PyTorch's freed-graph error) on each,
// given by `reg(saved_tensor, pack, unpack)` (SavedTensor.register_hooks as PyTorch defines it:
// fastgrad's wrapper notes hooks put on a saved tensor by others, hooks.py).
// A node whose saved tensors cannot take hooks gets `refuse` (a hook raising that error) as a
// pre-hook instead, so PyTorch's engine refuses it too (see engine._mark_freed).
void mark_freed(const Graph& g, py::handle freed_key, py::handle refuse, py::handle spec_fn,
                py::handle reg, py::handle pack, py::handle unpack);

// Whether a node of the walk whose saved values lowering reads holds a tensor packed by
// saved-tensor hooks (its SavedTensor's `unpack_hook` set; also a node fastgrad freed, whose
// hooks raise PyTorch's freed-graph error when PyTorch's engine unpacks). PyTorch unpacks such a tensor once per backward; fastgrad reads
// saved values several times (signature, lowering, each plan run), which would run a one-shot
// hook twice or recompute a checkpointed segment again each time, so the call goes to
// PyTorch (engine._capture). A SavedTensor that does not show its hook (torch 2.5) counts as
// hooked: the caller asks only once saved-tensor hooks were pushed in the process.
bool saved_hooks_in(const Graph& g, py::handle spec_fn);

}  // namespace fg
