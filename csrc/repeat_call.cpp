// See repeat_call.h. Each check is the one engine.hit, engine._still_bound or runtime.execute
// makes, in the same order; where one would need Python (a replay, a churn record, a compile
// due), the call is handed back to it.
#include "repeat_call.h"

#include "call_args.h"
#include "capture.h"
#include "executor.h"
#include "py_calls.h"

namespace fg {
namespace {

// Set by repeat_setup, held for the life of the process (see capture.cpp's Names).
struct State {
  PyObject *entries, *binder_cls, *acc_cls_fn, *acc_cls, *spec_fn, *freed_key, *tie_policy,
      *refuse, *pack, *unpack, *hooks_state, *tensor_hooks, *churn_waiting, *runtime;
};
State S{};
struct Names {
  PyObject *plan, *tape, *nbound, *tied, *churn, *recent, *executor, *executor_dev, *jit_pending,
      *runs, *version, *device, *any, *cuda_executor, *cpu, *execute, *compile_due;
};
Names N{};

// Whether the signed call can run from the cached entry's plan through its Executor alone (or,
// under create_graph, through runtime.execute's block), and then runs it: its results (a list),
// or a null object (the Python path decides).
py::object run_cached(const py::object& key, Binder& bind, bool create_graph) {
  PyObject* e = PyDict_GetItemWithError(S.entries, key.ptr());
  if (!e) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return py::object();  // a miss: engine.run derives it (and tells its churn record)
  }
  py::handle entry(e);
  const py::object plan = py_attr(entry, N.plan);
  if (plan.is_none() || PyObject_Length(py_attr(entry, N.tape).ptr()) != 0) return py::object();
  // engine._still_bound without a tape: as many tensors bound, tied ones unchanged
  PyObject* tensors = bind.tensors.ptr();
  const Py_ssize_t nbound = PyList_GET_SIZE(tensors);
  if (nbound == 0 || PyLong_AsSsize_t(py_attr(entry, N.nbound).ptr()) != nbound) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return py::object();
  }
  for (auto k : py_attr(entry, N.tied)) {
    const Py_ssize_t i = PyLong_AsSsize_t(k.ptr());
    if (i < 0 || i >= nbound) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return py::object();
    }
    if (py_truthy(py_attr(PyList_GET_ITEM(tensors, i), N.version))) return py::object();
  }
  const py::object rec = py_attr(entry, N.churn);
  if (!rec.is_none() && py_truthy(py_attr(rec, N.recent))) return py::object();  // (rec.hit())
  if (create_graph)  // the plan as one autograd Function (blocks.py)
    return py_attr(S.runtime, N.execute)(plan, bind.tensors, true);
  // runtime.execute's repeat: the Executor of the plan's last run on this device
  const py::object exe = py_attr(plan, N.executor);
  const py::object dev = py_attr(PyList_GET_ITEM(tensors, 0), N.device);
  if (exe.is_none() || !py_equal(py_attr(plan, N.executor_dev), dev)) return py::object();
  const bool on_cpu = py_equal(device_type(dev), py::handle(N.cpu));
  if (!on_cpu && !py_truthy(py_attr(S.runtime, N.cuda_executor))) return py::object();
  // (a stand-in for the Executor, as tests use, is called through Python)
  py::object res = py::isinstance<Executor>(exe) ? exe.cast<const Executor&>().run(bind.tensors)
                                                 : exe.attr("run")(bind.tensors);
  if (res.is_none()) return py::object();  // another layout: the Python path runs the steps
  const py::object runs = py_attr(plan, N.runs);
  PyObject* more = PyNumber_Add(runs.ptr(), py::int_(1).ptr());
  if (!more || PyObject_SetAttr(plan.ptr(), N.runs, more) < 0) {
    Py_XDECREF(more);
    throw py::error_already_set();
  }
  Py_DECREF(more);
  if (on_cpu && py_truthy(py_attr(plan, N.jit_pending))) py_attr(S.runtime, N.compile_due)(plan);
  return res;
}

}  // namespace

py::object repeat_call(py::handle outputs, py::handle inputs, py::handle grad_outputs,
                       py::handle retain_graph, bool create_graph) {
  if (!S.entries) return py::none();
  if (py_truthy(PyList_GET_ITEM(S.churn_waiting, 0))) return py::none();
  const py::object args = plain_call_args(outputs, inputs, grad_outputs);
  if (args.is_none()) return py::none();
  const py::object out_edges = args[py::int_(0)], gos = args[py::int_(1)],
                   given = args[py::int_(2)];
  // engine._capture: inputs are edges (node, k) or leaf tensors, found through their
  // AccumulateGrad nodes
  py::set input_ids, leaf_ids;
  for (auto e : given) {
    if (PyTuple_Check(e.ptr()))
      input_ids.add(py_id(PyTuple_GET_ITEM(e.ptr(), 0)));
    else
      leaf_ids.add(py_id(e));
  }
  py::list out_nodes;
  for (auto e : out_edges) out_nodes.append(PyTuple_GET_ITEM(e.ptr(), 0));
  py::handle acc = py::none();
  if (PySet_GET_SIZE(leaf_ids.ptr()) > 0) {
    if (!S.acc_cls) S.acc_cls = py::handle(S.acc_cls_fn)().release().ptr();
    acc = S.acc_cls;
  }
  Graph g = collect(out_nodes, input_ids, leaf_ids, acc);
  py::list in_edges;
  for (auto e : given) {
    if (PyTuple_Check(e.ptr())) {
      in_edges.append(e);
      continue;
    }
    PyObject* node = PyDict_GetItemWithError(g.leaf_nodes.ptr(), py_id(e).ptr());
    if (!node) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return py::none();  // a leaf the outputs do not reach (engine._leaf_edge)
    }
    in_edges.append(py::make_tuple(py::handle(node), 0));
  }
  // graph_cache.signature: nodes are looked at for tensor hooks once one was registered
  PyObject* any_hooks = PyDict_GetItemWithError(S.hooks_state, N.any);
  if (!any_hooks && PyErr_Occurred()) throw py::error_already_set();
  const py::handle hooks_fn = any_hooks && py_truthy(any_hooks) ? S.tensor_hooks : Py_None;
  Binder bind;
  const py::tuple sig = signature(g, out_edges, gos, in_edges, bind, create_graph, S.spec_fn,
                                  hooks_fn, S.freed_key, S.tie_policy);
  const py::object key = sig[0], freed = sig[1];
  if (!key.is_none() && !py_truthy(freed)) {
    py::object res = run_cached(key, bind, create_graph);
    if (res) {
      const bool retain = retain_graph.is_none() ? create_graph : py_truthy(retain_graph);
      if (!retain) mark_freed(g, S.freed_key, S.refuse, S.spec_fn, S.pack, S.unpack);
      PyObject* t = PySequence_Tuple(res.ptr());
      if (!t) throw py::error_already_set();
      return py::make_tuple(py::reinterpret_steal<py::object>(t), py::none());
    }
  }
  // handed to engine.hit: the binder as the Python class lowering calls
  py::object binder = py::handle(S.binder_cls)();
  Binder& b = binder.cast<Binder&>();
  b.tensors = std::move(bind.tensors);
  b.keys = std::move(bind.keys);
  b.device = std::move(bind.device);
  b.pending_host = std::move(bind.pending_host);
  py::object graph = py::cast(std::move(g));
  return py::make_tuple(py::none(), py::make_tuple(out_edges, gos, given, in_edges, graph, binder,
                                                   key, freed));
}

void repeat_setup(py::dict entries, py::object binder_cls, py::object acc_cls_fn,
                  py::object spec_fn, py::object freed_key, py::dict tie_policy,
                  py::object refuse, py::object pack, py::object unpack, py::dict hooks_state,
                  py::object tensor_hooks, py::list churn_waiting, py::object runtime) {
  if (!N.plan)
    N = Names{py_intern("plan"),     py_intern("tape"),         py_intern("nbound"),
              py_intern("tied"),     py_intern("churn"),        py_intern("recent"),
              py_intern("executor"), py_intern("executor_dev"), py_intern("jit_pending"),
              py_intern("runs"),     py_intern("_version"),     py_intern("device"),
              py_intern("any"),      py_intern("CUDA_EXECUTOR"), py_intern("cpu"),
              py_intern("execute"),  py_intern("_compile_due")};
  if (PyList_GET_SIZE(churn_waiting.ptr()) < 1)
    throw py::value_error("churn_waiting must hold the count of waiting records");
  // (a second setup replaces the first: the old objects are kept, as capture_setup's are)
  S = State{entries.release().ptr(),    binder_cls.release().ptr(), acc_cls_fn.release().ptr(),
            nullptr,                    spec_fn.release().ptr(),    freed_key.release().ptr(),
            tie_policy.release().ptr(), refuse.release().ptr(),     pack.release().ptr(),
            unpack.release().ptr(),     hooks_state.release().ptr(), tensor_hooks.release().ptr(),
            churn_waiting.release().ptr(), runtime.release().ptr()};
}

}  // namespace fg
