// The arguments of a plain fastgrad.grad call, checked and turned into graph edges in one C++
// pass (api._fast): each check reads a tensor attribute through Python, and as bytecode those
// reads and their loops cost about a fifth of a call on a small graph kept between calls.
#pragma once

#include <pybind11/pybind11.h>

namespace fg {
namespace py = pybind11;

// (out_edges, grad_outputs, in_edges) of a plain call, or None where the call is not plain and
// api._grad takes it whole. Plain: outputs and inputs are a tensor or a non-empty tuple or list
// of them, each of type torch.Tensor or torch.nn.Parameter exactly and requiring grad; every
// output has a grad_fn; no input has tensor hooks (_backward_hooks); grad_outputs is None with
// floating-point outputs of one element (implicit ones: torch.ones_like), or a tensor or a
// tuple or list of them, one per output, each a torch.Tensor of its output's shape, both
// floating point, the output not nested. Edges: (grad_fn, output_nr); a leaf input stays the
// tensor (the walk finds its node).
py::object plain_call_args(py::handle outputs, py::handle inputs, py::handle grad_outputs);

// The grad_outputs part of those rules, on its own (api._grad, for a call not plain for other
// reasons): what torch's _make_grads returns where it needs no checks, as a tuple (implicit
// ones made with torch.ones_like), or None. `outputs`: a sequence.
py::object plain_grads(py::handle outputs, py::handle grad_outputs);

// Called once at import: torch.Tensor, torch.nn.Parameter and torch.ones_like.
void call_args_setup(py::object tensor_cls, py::object parameter_cls, py::object ones_like);

}  // namespace fg
