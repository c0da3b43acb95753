// See call_args.h. The checks are the ones api._fast and api._plain_grads made in Python, in
// the same order; a Python exception from an attribute read propagates as it did there.
#include "call_args.h"

#include "py_calls.h"

namespace fg {
namespace {

PyObject* g_tensor = nullptr;     // torch.Tensor
PyObject* g_parameter = nullptr;  // torch.nn.Parameter
PyObject* g_ones_like = nullptr;  // torch.ones_like
struct Names {
  PyObject *requires_grad, *grad_fn, *output_nr, *backward_hooks, *shape, *dtype, *is_floating_point,
      *is_nested;
} N{};

bool plain_type(PyObject* t) {
  return Py_TYPE(t) == reinterpret_cast<PyTypeObject*>(g_tensor) ||
         Py_TYPE(t) == reinterpret_cast<PyTypeObject*>(g_parameter);
}

// `ts` as a new tuple when it is a plain tensor or a non-empty tuple or list of plain tensors
// requiring grad; a null object otherwise.
py::object plain_tensors(py::handle ts) {
  py::tuple out;
  PyObject* o = ts.ptr();
  if (plain_type(o)) {
    out = py::make_tuple(ts);
  } else if ((PyTuple_CheckExact(o) || PyList_CheckExact(o)) && PySequence_Size(o) > 0) {
    out = py::reinterpret_steal<py::tuple>(PySequence_Tuple(o));
    if (!out) throw py::error_already_set();
  } else {
    return py::object();
  }
  for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(out.ptr()); i < n; ++i) {
    PyObject* t = PyTuple_GET_ITEM(out.ptr(), i);
    if (!plain_type(t) || !py_truthy(py_attr(t, N.requires_grad))) return py::object();
  }
  return std::move(out);
}

bool floating(py::handle t) { return py_truthy(py_attr(py_attr(t, N.dtype), N.is_floating_point)); }

}  // namespace

py::object plain_grads(py::handle outputs, py::handle grad_outputs) {
  const py::object outs_fast = py_fast(outputs, "outputs is not a sequence");
  PyObject* outs = outs_fast.ptr();
  const Py_ssize_t nout = PySequence_Fast_GET_SIZE(outs);
  py::tuple gos;
  if (grad_outputs.is_none()) {
    // implicit gradients: real scalar outputs only (numel from the shape: no method call)
    gos = py::tuple(nout);
    for (Py_ssize_t i = 0; i < nout; ++i) {
      py::handle o = PySequence_Fast_GET_ITEM(outs, i);
      if (Py_TYPE(o.ptr()) != reinterpret_cast<PyTypeObject*>(g_tensor)) return py::none();
      py::object shape = py_attr(o, N.shape);
      Py_ssize_t numel = 1;
      for (Py_ssize_t d = 0, nd = PyTuple_GET_SIZE(shape.ptr()); d < nd; ++d)
        numel *= PyLong_AsSsize_t(PyTuple_GET_ITEM(shape.ptr(), d));
      if (numel != 1 || !floating(o)) return py::none();
      PyObject* one = PyObject_CallOneArg(g_ones_like, o.ptr());  // preserve_format by default
      if (!one) throw py::error_already_set();
      PyTuple_SET_ITEM(gos.ptr(), i, one);
    }
  } else {
    PyObject* g = grad_outputs.ptr();
    // (a tensor subclass fails the exact type check below either way)
    if (Py_TYPE(g) == reinterpret_cast<PyTypeObject*>(g_tensor))
      gos = py::make_tuple(grad_outputs);
    else if (PyTuple_CheckExact(g) || PyList_CheckExact(g))
      gos = py::reinterpret_steal<py::tuple>(PySequence_Tuple(g));
    else
      return py::none();
    if (!gos) throw py::error_already_set();
    if (PyTuple_GET_SIZE(gos.ptr()) != nout) return py::none();
    for (Py_ssize_t i = 0; i < nout; ++i) {
      py::handle o = PySequence_Fast_GET_ITEM(outs, i), t = PyTuple_GET_ITEM(gos.ptr(), i);
      if (Py_TYPE(o.ptr()) != reinterpret_cast<PyTypeObject*>(g_tensor) ||
          Py_TYPE(t.ptr()) != reinterpret_cast<PyTypeObject*>(g_tensor) ||
          py_truthy(py_attr(o, N.is_nested)) || !py_equal(py_attr(t, N.shape), py_attr(o, N.shape)) ||
          !floating(o) || !floating(t))
        return py::none();
    }
  }
  return std::move(gos);
}

py::object plain_call_args(py::handle outputs, py::handle inputs, py::handle grad_outputs) {
  py::object outs = plain_tensors(outputs), ins = plain_tensors(inputs);
  if (!outs || !ins) return py::none();
  const Py_ssize_t nout = PyTuple_GET_SIZE(outs.ptr()), nin = PyTuple_GET_SIZE(ins.ptr());
  py::list out_edges(nout);
  for (Py_ssize_t i = 0; i < nout; ++i) {
    py::handle o = PyTuple_GET_ITEM(outs.ptr(), i);
    py::object fn = py_attr(o, N.grad_fn);
    if (fn.is_none()) return py::none();
    out_edges[i] = py::make_tuple(fn, py_attr(o, N.output_nr));
  }
  for (Py_ssize_t i = 0; i < nin; ++i)
    if (py_truthy(py_attr(PyTuple_GET_ITEM(ins.ptr(), i), N.backward_hooks))) return py::none();
  py::object gos = plain_grads(outs, grad_outputs);
  if (gos.is_none()) return py::none();
  py::list in_edges(nin);
  for (Py_ssize_t i = 0; i < nin; ++i) {
    py::handle t = PyTuple_GET_ITEM(ins.ptr(), i);
    py::object fn = py_attr(t, N.grad_fn);
    if (fn.is_none())
      in_edges[i] = t;
    else
      in_edges[i] = py::make_tuple(fn, py_attr(t, N.output_nr));
  }
  return py::make_tuple(out_edges, gos, in_edges);
}

void call_args_setup(py::object tensor_cls, py::object parameter_cls, py::object ones_like) {
  if (!N.grad_fn)
    N = Names{py_intern("requires_grad"), py_intern("grad_fn"), py_intern("output_nr"),
              py_intern("_backward_hooks"), py_intern("shape"),  py_intern("dtype"),
              py_intern("is_floating_point"), py_intern("is_nested")};
  Py_XDECREF(g_tensor);
  Py_XDECREF(g_parameter);
  Py_XDECREF(g_ones_like);
  g_tensor = tensor_cls.release().ptr();
  g_parameter = parameter_cls.release().ptr();
  g_ones_like = ones_like.release().ptr();
}

}  // namespace fg
