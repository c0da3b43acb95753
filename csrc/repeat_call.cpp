// See repeat_call.h. Each check is the one engine.hit, engine._still_bound or runtime.execute
// makes, in the same order; where one would need Python (a replay, a churn record, a compile
// due), the call is handed back to it.
#include "repeat_call.h"

#include "call_args.h"
#include "capture.h"
#include "executor.h"
#include "node_hooks.h"
#include "py_calls.h"
#include "saved_tensors.h"

namespace fg {
namespace {

// The modules whose objects the Python path reads, set by repeat_setup and held for the life
// of the process (as capture.cpp's). Their attributes are read on each use, as Python reads
// them, so that a name rebound or patched (tests do) is seen here too.
struct Modules {
  PyObject *engine, *graph_cache, *runtime, *hooks, *churn, *node_view, *plan;
};
Modules M{};
PyObject* g_acc_cls = nullptr;  // engine._accumulate_grad_class(), once
struct Names {
  PyObject *plan, *tape, *nbound, *tied, *churn, *recent, *executor, *executor_dev, *jit_pending,
      *runs, *version, *device, *any, *cuda_executor, *cpu, *execute, *compile_due, *entries,
      *spec, *freed, *recompute, *state, *tensor_hooks, *waiting, *acc_cls, *leaf_edge, *binder,
      *refuse_freed, *drop_saved, *refuse_unpack, *misses, *find, *skip, *given, *saved, *node, *node_dicts, *live, *saved_register;
};
Names N{};

// Whether the signed call can run from the cached entry's plan through its Executor alone (or,
// under create_graph, through runtime.execute's block), and then runs it: its results (a list),
// or a null object (the Python path decides).
py::object run_cached(const py::object& key, Binder& bind, bool create_graph) {
  const py::object entries = py_attr(M.graph_cache, N.entries);
  if (!PyDict_Check(entries.ptr())) throw py::type_error("graph_cache._ENTRIES is not a dict");
  PyObject* e = PyDict_GetItemWithError(entries.ptr(), key.ptr());
  if (!e) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return py::object();  // a miss: engine.run derives it (and tells its churn record)
  }
  const py::object entry = py::reinterpret_borrow<py::object>(e);
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
    return py_attr(M.engine, N.execute)(plan, bind.tensors, true);  // (as engine.hit)
  // runtime.execute's repeat: the Executor of the plan's last run on this device
  const py::object exe = py_attr(plan, N.executor);
  const py::object dev = py_attr(PyList_GET_ITEM(tensors, 0), N.device);
  if (exe.is_none() || !py_equal(py_attr(plan, N.executor_dev), dev)) return py::object();
  const bool on_cpu = py_equal(device_type(dev), py::handle(N.cpu));
  if (!on_cpu && !py_truthy(py_attr(M.runtime, N.cuda_executor))) return py::object();
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
  if (on_cpu && py_truthy(py_attr(plan, N.jit_pending))) py_attr(M.runtime, N.compile_due)(plan);
  return res;
}

}  // namespace

py::object repeat_call(py::handle outputs, py::handle inputs, py::handle grad_outputs,
                       py::handle retain_graph, bool create_graph) {
  if (!M.engine) return py::none();
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
  py::handle acc = Py_None;
  if (PySet_GET_SIZE(leaf_ids.ptr()) > 0) {
    if (!g_acc_cls) g_acc_cls = py_attr(M.engine, N.acc_cls)().release().ptr();
    acc = g_acc_cls;
  }
  Graph g = collect(out_nodes, input_ids, leaf_ids, acc);
  py::list in_edges;
  for (auto e : given) {
    if (PyTuple_Check(e.ptr())) {
      in_edges.append(e);
      continue;
    }
    PyObject* node = PyDict_GetItemWithError(g.leaf_nodes.ptr(), py_id(e).ptr());
    if (node) {
      in_edges.append(py::make_tuple(py::handle(node), 0));
    } else if (PyErr_Occurred()) {
      throw py::error_already_set();
    } else {  // a leaf the outputs do not reach
      in_edges.append(py_attr(M.engine, N.leaf_edge)(e));
    }
  }
  // engine._capture: while some record sends calls to PyTorch unsigned, this structure's may
  py::object rec = py::none();
  const py::object waiting = py_attr(M.churn, N.waiting);
  if (py_truthy(waiting[py::int_(0)]) && py_truthy(py_attr(M.churn, N.misses))) {
    rec = py_attr(M.churn, N.find)(g.structure, PyObject_Length(out_edges.ptr()),
                                   PyObject_Length(in_edges.ptr()), create_graph);
    if (!rec.is_none() &&
        py_truthy(rec.attr(N.skip)(py_attr(M.engine, N.given)(given, gos))))
      return py::make_tuple(py::none(), py::none());  // routed (churn.Routed)
  }
  const py::object hook_state = py_attr(M.hooks, N.state);
  const py::object spec = py_attr(M.graph_cache, N.spec), freed_key = py_attr(M.node_view, N.freed);
  // engine._capture: saved tensors packed by saved-tensor hooks go to PyTorch
  if (py_truthy(hook_state[N.saved]) && saved_hooks_in(g, spec))
    return py::make_tuple(py::none(), py::none());
  // and so do graphs where a node has hooks (hooks.node_hooks_in)
  if (py_truthy(hook_state[N.live]) &&
      node_hooks_in(g.order, py_attr(M.hooks, N.node_dicts), hook_state[N.node]))
    return py::make_tuple(py::none(), py::none());
  // graph_cache.signature: nodes are looked at for tensor hooks once one was registered
  const py::object hooks_fn =
      py_truthy(hook_state[N.any]) ? py_attr(M.hooks, N.tensor_hooks) : py::none();
  Binder bind;
  const py::tuple sig = signature(g, out_edges, gos, in_edges, bind, create_graph, spec, hooks_fn,
                                  freed_key, py_attr(M.plan, N.recompute));
  const py::object key = sig[0], freed = sig[1];
  if (!key.is_none() && !py_truthy(freed)) {
    py::object res = run_cached(key, bind, create_graph);
    if (res) {
      const bool retain = retain_graph.is_none() ? create_graph : py_truthy(retain_graph);
      if (!retain)  // (engine._mark_freed)
        mark_freed(g, freed_key, py_attr(M.engine, N.refuse_freed), spec,
                   py_attr(M.hooks, N.saved_register), py_attr(M.engine, N.drop_saved),
                   py_attr(M.engine, N.refuse_unpack));
      PyObject* t = PySequence_Tuple(res.ptr());
      if (!t) throw py::error_already_set();
      return py::make_tuple(py::reinterpret_steal<py::object>(t), py::none());
    }
  }
  // handed to engine.hit: the binder as the Python class lowering calls
  py::object binder = py_attr(M.engine, N.binder)();
  Binder& b = binder.cast<Binder&>();
  b.tensors = std::move(bind.tensors);
  b.keys = std::move(bind.keys);
  b.device = std::move(bind.device);
  b.pending_host = std::move(bind.pending_host);
  b.seen = std::move(bind.seen);
  py::object graph = py::cast(std::move(g));
  return py::make_tuple(py::none(), py::make_tuple(out_edges, gos, given, in_edges, graph, binder,
                                                   key, freed, rec));
}

void repeat_setup(py::module_ engine, py::module_ graph_cache, py::module_ runtime,
                  py::module_ hooks, py::module_ churn, py::module_ node_view, py::module_ plan) {
  if (!N.plan)
    N = Names{py_intern("plan"),          py_intern("tape"),         py_intern("nbound"),
              py_intern("tied"),          py_intern("churn"),        py_intern("recent"),
              py_intern("executor"),      py_intern("executor_dev"), py_intern("jit_pending"),
              py_intern("runs"),          py_intern("_version"),     py_intern("device"),
              py_intern("any"),           py_intern("CUDA_EXECUTOR"), py_intern("cpu"),
              py_intern("execute"),       py_intern("_compile_due"), py_intern("_ENTRIES"),
              py_intern("_spec"),         py_intern("FREED"),        py_intern("RECOMPUTE"),
              py_intern("_STATE"),        py_intern("tensor_hooks"), py_intern("_WAITING"),
              py_intern("_accumulate_grad_class"), py_intern("_leaf_edge"), py_intern("_Binder"),
              py_intern("_refuse_freed"), py_intern("_drop_saved"),  py_intern("_refuse_unpack"),
              py_intern("MISSES"),        py_intern("find"),         py_intern("skip"),
              py_intern("_given"),        py_intern("saved"),
              py_intern("node"),          py_intern("_node_dicts"),
              py_intern("live"),          py_intern("_orig_saved_register")};
  // (a second setup replaces the first: the old modules are kept, as capture_setup's objects)
  M = Modules{engine.release().ptr(), graph_cache.release().ptr(), runtime.release().ptr(),
              hooks.release().ptr(),  churn.release().ptr(),       node_view.release().ptr(),
              plan.release().ptr()};
  g_acc_cls = nullptr;
}

}  // namespace fg
