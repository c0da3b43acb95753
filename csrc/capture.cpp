// Capture in C++ (see capture.h). Everything is read through Python attribute access, as the
// Python code it replaced did; the gain is the interpreter overhead between those reads.
#include "capture.h"

#include <unordered_set>

#include "node_spec.h"
#include "py_calls.h"
#include "signature_key.h"

namespace fg {
namespace {

// Objects held for the life of the process (never released: they may outlive the interpreter's
// own teardown of the modules they come from).
struct Names {
  PyObject *dtype, *layout, *device, *type, *grad_fn, *requires_grad, *data_ptr, *shape, *stride,
      *output_nr, *next_functions, *variable, *input_metadata, *metadata, *region,
      *saved_tensors, *fallback;
};
Names N{};
PyObject* g_dtype_codes = nullptr;   // dict: torch.dtype -> code
PyObject* g_strided = nullptr;       // torch.strided
PyObject* g_device_types = nullptr;  // tuple of str
PyObject* g_tensor_cls = nullptr;    // torch.Tensor
PyObject* g_cpu_str = nullptr;       // "cpu" (a device type)
PyObject* g_to_device = nullptr;     // engine._host_scalar_to(t, device)

// (shape, dtype, device) of one InputMetadata entry; false: not part of a key.
bool write_meta(KeyWriter& w, py::handle m) {
  return w.ints(py_attr(m, N.shape)) && w.obj(py_attr(m, N.dtype)) && w.obj(py_attr(m, N.device));
}

// torch.device -> its type (device_type)
PyObject* g_device_type_of = nullptr;

// Heap-held and never destroyed: its destructor would run after the interpreter is gone.
std::unordered_map<PyObject*, Spec>& g_specs = *new std::unordered_map<PyObject*, Spec>();

}  // namespace

Spec& spec_of(py::handle fn, py::handle spec_fn) {
  PyObject* cls = reinterpret_cast<PyObject*>(Py_TYPE(fn.ptr()));
  auto it = g_specs.find(cls);
  if (it != g_specs.end()) return it->second;
  py::tuple t = spec_fn(py::handle(cls), fn);
  Spec s;
  s.cls = py::reinterpret_borrow<py::object>(cls);
  s.lowerable = py_truthy(t[0]);
  s.region = py_truthy(t[1]);
  for (auto a : py::iter(t[2])) s.saved.push_back(py::reinterpret_borrow<py::object>(a));
  s.holds_saved = py_truthy(t[3]);
  for (auto a : py::iter(t[4])) {
    py::tuple names = py::reinterpret_borrow<py::tuple>(a);
    s.raw.emplace_back(names[0], names[1]);
  }
  s.releases = t.size() > 5 && py_truthy(t[5]);
  for (const auto& a : s.saved) {
    bool tensor = false;
    for (const auto& r : s.raw) tensor = tensor || py_equal(r.second, a);
    (tensor ? s.saved_tensors : s.saved_values).push_back(a);
  }
  return g_specs.emplace(cls, std::move(s)).first->second;
}

// The `type` getter builds a new string on every read (about 2,900 instructions), and a call's
// first tensor reads it (the binder's device is not known yet). Devices are few: the dict stays
// small.
py::object device_type(py::handle dev) {
  if (!g_device_type_of && !(g_device_type_of = PyDict_New())) throw py::error_already_set();
  PyObject* hit = PyDict_GetItemWithError(g_device_type_of, dev.ptr());
  if (hit) return py::reinterpret_borrow<py::object>(hit);
  if (PyErr_Occurred()) throw py::error_already_set();
  py::object type = py_attr(dev, N.type);
  if (PyDict_SetItem(g_device_type_of, dev.ptr(), type.ptr()) < 0) throw py::error_already_set();
  return type;
}

Py_ssize_t Binder::index(py::handle t, py::object* key) {
  auto again = seen.find(t.ptr());
  if (again != seen.end()) {
    if (key) *key = again->second.key;
    return again->second.number;
  }
  py::object k;
  const Py_ssize_t n = number(t, &k);
  // (one the compiled path cannot read is not kept: held, it would outlive a fallback to
  // PyTorch's engine that frees it on the way)
  if (n >= 0) seen.emplace(t.ptr(), Seen{py::reinterpret_borrow<py::object>(t), k, n});
  if (key) *key = std::move(k);
  return n;
}

Py_ssize_t Binder::number(py::handle t, py::object* key) {
  py::object dtype = py_attr(t, N.dtype);
  int has = PyDict_Contains(g_dtype_codes, dtype.ptr());
  if (has < 0) throw py::error_already_set();
  if (!has || !py_equal(py_attr(t, N.layout), g_strided)) return -1;
  py::object dev = py_attr(t, N.device);
  py::object gf = py_attr(t, N.grad_fn);
  bool rg = py_truthy(py_attr(t, N.requires_grad));
  bool host_scalar = false;  // a 0-dim CPU tensor in a call whose device may be CUDA
  if (!py_equal(dev, device)) {
    py::object type = device_type(dev);
    if (!rg && py_equal(type, py::handle(g_cpu_str)) && PyObject_Length(py_attr(t, N.shape).ptr()) == 0) {
      host_scalar = true;
    } else {
      if (!device.is_none()) return -1;
      int ok = PySequence_Contains(g_device_types, type.ptr());
      if (ok < 0) throw py::error_already_set();
      if (!ok) return -1;
      device = dev;
      if (!py_equal(type, py::handle(g_cpu_str)))
        for (Py_ssize_t m : pending_host) tensors[m] = py::handle(g_to_device)(tensors[m], device);
      pending_host.clear();
    }
  }
  py::object producer = !gf.is_none() ? py_id(gf) : rg ? py_id(t) : py::none();
  py::object onr = !gf.is_none() ? py_attr(t, N.output_nr) : py::int_(0);
  py::tuple k = py::make_tuple(py_call(t, N.data_ptr), py_attr(t, N.shape),
                               py_call(t, N.stride), dtype, py::bool_(rg), producer, onr);
  Py_ssize_t n;
  PyObject* hit = PyDict_GetItemWithError(keys.ptr(), k.ptr());
  if (hit) {
    n = PyLong_AsSsize_t(hit);
  } else {
    if (PyErr_Occurred()) throw py::error_already_set();
    n = PyList_GET_SIZE(tensors.ptr());
    keys[k] = py::int_(n);
    if (!host_scalar) {
      tensors.append(t);
    } else if (device.is_none()) {  // the device is not known yet: copied once it is
      tensors.append(t);
      pending_host.push_back(n);
    } else {
      tensors.append(py::handle(g_to_device)(t, device));
    }
  }
  if (key) *key = std::move(k);
  return n;
}

py::object Binder::record(py::handle t) {
  py::object key;
  Py_ssize_t n = index(t, &key);
  if (n < 0) return py::none();
  py::tuple k = key;
  return py::make_tuple(n, k[1], k[2], k[3], k[4]);
}

bool Graph::runs(PyObject* fn) const {
  PyObject* nf = edges.at(fn);
  for (Py_ssize_t i = 0, e = PyTuple_GET_SIZE(nf); i < e; ++i) {
    PyObject* m = PyTuple_GET_ITEM(PyTuple_GET_ITEM(nf, i), 0);
    if (m != Py_None && need.at(m)) return true;
  }
  return false;
}

py::dict Graph::needed() const {
  if (!needed_) {
    py::dict d;
    for (const auto& [n, hit] : need) d[py_id(n)] = py::bool_(hit);
    needed_ = std::move(d);
  }
  return needed_;
}

py::dict Graph::nexts() const {
  if (!nexts_) {
    py::dict d;
    for (const auto& [n, nf] : edges) d[py_id(n)] = py::handle(nf);
    nexts_ = std::move(d);
  }
  return nexts_;
}

namespace {

// The objects whose ids a Python set holds (ids are addresses in CPython), so that the walk
// tests a node without making an int object for it.
std::unordered_set<PyObject*> addresses(const py::set& ids) {
  std::unordered_set<PyObject*> out;
  for (auto i : ids) {
    out.insert(static_cast<PyObject*>(PyLong_AsVoidPtr(i.ptr())));
    if (PyErr_Occurred()) throw py::error_already_set();
  }
  return out;
}

}  // namespace

Graph collect(const py::list& out_nodes, const py::set& input_ids, const py::set& leaf_ids,
              py::handle acc_cls) {
  Graph g;
  g.roots = out_nodes;
  const std::unordered_set<PyObject*> inputs = addresses(input_ids),
                                      leaves = addresses(leaf_ids);
  std::vector<PyObject*> post;
  std::vector<std::pair<PyObject*, bool>> stack;  // (node, expanded)
  for (auto root : out_nodes) {
    // A node is expanded when first popped, so a node pushed by several consumers is finished
    // before any of them (post-order on a DAG).
    stack.emplace_back(root.ptr(), false);
    while (!stack.empty()) {
      auto [n, done] = stack.back();
      stack.pop_back();
      if (done) {
        PyObject* nf = g.edges.at(n);
        bool hit = inputs.count(n) > 0;
        if (!hit && acc_cls.ptr() == reinterpret_cast<PyObject*>(Py_TYPE(n))) {
          py::object var = py_attr(n, N.variable);
          if (leaves.count(var.ptr())) {
            g.leaf_nodes[py_id(var)] = py::handle(n);
            hit = true;
          }
        }
        for (Py_ssize_t i = 0, e = PyTuple_GET_SIZE(nf); !hit && i < e; ++i) {
          PyObject* m = PyTuple_GET_ITEM(PyTuple_GET_ITEM(nf, i), 0);
          hit = m != Py_None && g.need.at(m);
        }
        g.need[n] = hit;
        post.push_back(n);
        continue;
      }
      if (g.edges.count(n)) continue;
      py::object nfo = py_attr(n, N.next_functions);
      if (!PyTuple_Check(nfo.ptr())) throw py::type_error("next_functions is not a tuple");
      PyObject* nf = nfo.ptr();
      g.held.push_back(std::move(nfo));  // holds the tuple (and so the nodes in it) for the call
      g.edges[n] = nf;
      stack.emplace_back(n, true);
      for (Py_ssize_t i = 0, e = PyTuple_GET_SIZE(nf); i < e; ++i) {
        PyObject* m = PyTuple_GET_ITEM(PyTuple_GET_ITEM(nf, i), 0);
        if (m != Py_None && !g.edges.count(m)) stack.emplace_back(m, false);
      }
    }
  }
  uint64_t h = 0x9e3779b97f4a7c15ull;
  for (auto it = post.rbegin(); it != post.rend(); ++it)
    if (g.need[*it]) {
      g.order.append(py::handle(*it));
      h = (h ^ reinterpret_cast<uintptr_t>(Py_TYPE(*it))) * 0x100000001b3ull;
      h ^= h >> 29;
    }
  g.structure = h;
  return g;
}

namespace {

using Positions = std::unordered_map<PyObject*, Py_ssize_t>;  // node -> place in the order

// Whether the sweep of this call ties saved tensors to the nodes that made them
// (engine._link_saved): only on a device whose plans compute saved values again
// (plan.RECOMPUTE: device type -> on, `policy`), known once the binder has met the call's
// device.
struct Ties {
  Positions& pos;  // the order's nodes; leaf inputs join it when the call ties
  const Graph& g;
  py::handle policy;
  int on = -1;
  bool operator()(const Binder& b) {
    if (on < 0 && !b.device.is_none()) {
      if (!PyDict_Check(policy.ptr())) throw py::type_error("the tie policy is not a dict");
      PyObject* v = PyDict_GetItemWithError(policy.ptr(), device_type(b.device).ptr());
      if (!v && PyErr_Occurred()) throw py::error_already_set();
      on = v && py_truthy(v);
      if (on) {
        // a leaf input is made by its AccumulateGrad node
        for (auto item : g.leaf_nodes) {
          auto at = pos.find(item.second.ptr());
          if (at == pos.end()) continue;
          pos[static_cast<PyObject*>(PyLong_AsVoidPtr(item.first.ptr()))] = at->second;
          if (PyErr_Occurred()) throw py::error_already_set();
        }
      }
    }
    return on == 1;
  }
};

// A tensor as it enters a signature: (number, shape, strides, dtype, requires_grad) and, in a
// call that ties saved tensors, the place of the node that made it in the order and its
// output number (-1: made outside the walk); or a tag alone for one the compiled path cannot
// read (Binder::index). A tie needs the tensor unchanged since it was made too:
// engine._still_bound checks that of the tensors an entry tied, so that the key need not read
// every tensor's version. (A tensor indexed before the call's device is known is a host scalar,
// made by no node.)
bool write_tensor(KeyWriter& w, py::handle t, Binder& bind, Ties& ties) {
  py::object key;
  const Py_ssize_t n = bind.index(t, &key);
  if (n < 0) {
    w.tag('x');
    return true;
  }
  PyObject* k = key.ptr();  // (data_ptr, shape, strides, dtype, requires_grad, producer, output_nr)
  w.tag('r');
  w.i64(n);
  w.tag(PyTuple_GET_ITEM(k, 4) == Py_True ? 'g' : 'c');
  if (ties(bind)) {
    PyObject* producer = PyTuple_GET_ITEM(k, 5);
    auto at = producer == Py_None
                  ? ties.pos.end()
                  : ties.pos.find(static_cast<PyObject*>(PyLong_AsVoidPtr(producer)));
    if (PyErr_Occurred()) throw py::error_already_set();
    if (at == ties.pos.end()) {
      w.i64(-1);
    } else {
      w.i64(at->second);
      w.int_of(PyTuple_GET_ITEM(k, 6));
    }
  } else {
    w.tag('u');  // (untied: a key of another call's policy never matches)
  }
  return w.ints(PyTuple_GET_ITEM(k, 1)) && w.ints(PyTuple_GET_ITEM(k, 2)) &&
         w.obj(PyTuple_GET_ITEM(k, 3));
}

// Whether a saved value is a tensor. torch.Tensor's metaclass makes isinstance a call of its
// __instancecheck__ (about 500 instructions): the saved values most nodes hold (None, numbers,
// int tuples, tensors) are told apart by their exact type first.
bool is_tensor(py::handle v) {
  PyObject* o = v.ptr();
  if (Py_TYPE(o) == reinterpret_cast<PyTypeObject*>(g_tensor_cls)) return true;
  if (o == Py_None || PyLong_CheckExact(o) || PyFloat_CheckExact(o) || PyBool_Check(o) ||
      PyTuple_CheckExact(o) || PyList_CheckExact(o))
    return false;
  const int r = PyObject_IsInstance(o, g_tensor_cls);
  if (r < 0) throw py::error_already_set();
  return r;
}

// Whether `v` is a list or tuple holding a tensor (IndexBackward0's saved indices).
bool holds_tensor(py::handle v) {
  PyObject* o = v.ptr();
  if (!PyTuple_CheckExact(o) && !PyList_CheckExact(o)) return false;
  for (auto item : v)
    if (is_tensor(item)) return true;
  return false;
}

// A saved value as it enters a signature; false when it cannot be part of a key (unhashable).
// A list of tensors (and Nones) is each tensor bound as a saved tensor, in order, as lowering
// binds them.
bool write_value(KeyWriter& w, py::handle v, Binder& bind, Ties& ties) {
  if (is_tensor(v)) return write_tensor(w, v, bind, ties);
  if (!holds_tensor(v)) return w.value(v);
  w.tag('L');
  w.i64(PyObject_Length(v.ptr()));
  for (auto item : v) {
    if (item.is_none()) {
      w.tag('N');
    } else if (!is_tensor(item) || !write_tensor(w, item, bind, ties)) {
      return false;
    }
  }
  return true;
}

// The length of sequence `seq`, then each item written by `write` (false: not part of a key).
template <class Write>
bool write_each(KeyWriter& w, py::handle seq, const char* what, Write write) {
  const py::object fast = py_fast(seq, what);
  PyObject* s = fast.ptr();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(s);
  w.i64(n);
  for (Py_ssize_t j = 0; j < n; ++j)
    if (!write(py::handle(PySequence_Fast_GET_ITEM(s, j)))) return false;
  return true;
}

// A key part kept under `name` in a node's metadata dict `md` by keep_part, or a null object
// when there is none of the current intern generation.
py::object kept_part(py::handle md, PyObject* name) {
  PyObject* hit = PyDict_GetItemWithError(md.ptr(), name);
  if (!hit && PyErr_Occurred()) throw py::error_already_set();
  if (hit && PyTuple_Check(hit) && PyTuple_GET_SIZE(hit) == 2 &&
      PyLong_AsLongLong(PyTuple_GET_ITEM(hit, 0)) == interned_generation())
    return py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(hit, 1));
  if (PyErr_Occurred()) throw py::error_already_set();
  return py::object();
}

void keep_part(py::handle md, PyObject* name, py::handle part) {
  if (PyDict_SetItem(md.ptr(), name, py::make_tuple(interned_generation(), part).ptr()) < 0)
    throw py::error_already_set();
}

// A node's input metadata as key parts, one bytes object per entry (a tuple), or None when
// one is not part of a key. PyTorch fixes a node's input metadata when it creates the node, so
// the parts are kept in the node's `metadata` dict (`md`, when it has one), with the intern
// generation that numbered their dtypes and devices, and read from there when a call meets
// the node again: a graph differentiated again, or a PINN's second call, which meets the
// forward nodes its first call read (the metadata records were about 15% of such a call).
py::object node_meta(py::handle fn, py::handle md) {
  static PyObject* cache_key = py_intern("fastgrad_signature_meta");
  if (!md.is_none()) {
    py::object kept = kept_part(md, cache_key);
    if (kept) return kept;
  }
  const py::object metas = py_fast(py_attr(fn, N.input_metadata), "_input_metadata is not a sequence");
  PyObject* ms = metas.ptr();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(ms);
  py::tuple parts(n);
  for (Py_ssize_t j = 0; j < n; ++j) {
    KeyWriter e;
    if (!write_meta(e, PySequence_Fast_GET_ITEM(ms, j))) return py::none();
    parts[j] = e.bytes();
  }
  if (!md.is_none()) keep_part(md, cache_key, parts);
  return std::move(parts);
}

// The saved values of node fn that are not tensors (spec.saved_values), as key bytes. PyTorch
// fixes them when it creates the node (only its tensors are freed, or unpacked anew), so they
// are kept in the node's `metadata` dict `md` with the intern generation that numbered them, as
// node_meta keeps the input metadata: a node met again (a graph differentiated again, a PINN's
// second call) reads only its tensors. None: one is not part of a key; a null object: one is a
// tensor after all (spec.values_fixed is then false and the caller reads every attribute).
py::object node_values(py::handle fn, py::handle md, Spec& spec) {
  static PyObject* cache_key = py_intern("fastgrad_signature_values");
  py::object kept = kept_part(md, cache_key);
  if (kept) return kept;
  KeyWriter e;
  for (const auto& a : spec.saved_values) {
    const py::object v = py_attr(fn, a.ptr());
    if (is_tensor(v)) {
      spec.values_fixed = false;
      return py::object();
    }
    if (!e.value(v)) return py::none();
  }
  py::bytes part = e.bytes();
  keep_part(md, cache_key, part);
  return std::move(part);
}

}  // namespace

py::object metadata_of(py::handle fn) {
  PyObject* md = PyObject_GetAttr(fn.ptr(), N.metadata);
  if (!md) {
    PyErr_Clear();
    return py::none();
  }
  py::object m = py::reinterpret_steal<py::object>(md);
  return PyDict_Check(md) ? m : py::object(py::none());
}

bool is_freed(py::handle md, py::handle freed_key) {
  if (md.is_none()) return false;
  PyObject* v = PyDict_GetItemWithError(md.ptr(), freed_key.ptr());
  if (!v && PyErr_Occurred()) throw py::error_already_set();
  return v && py_truthy(v);
}

py::tuple signature(const Graph& g, py::handle out_edges, py::handle grad_tensors,
                    py::handle in_edges, Binder& bind, bool create_graph,
                    py::handle spec_fn, py::handle hooks_fn, py::handle freed_key,
                    py::handle tie_policy) {
  Positions pos;
  Py_ssize_t norder = PyList_GET_SIZE(g.order.ptr());
  for (Py_ssize_t i = 0; i < norder; ++i) pos[PyList_GET_ITEM(g.order.ptr(), i)] = i;
  auto position = [&](py::handle n) {
    auto it = pos.find(n.ptr());
    return it == pos.end() ? Py_ssize_t(-1) : it->second;
  };
  Ties ties{pos, g, tie_policy};
  bool freed = false;
  auto none = [&] { return py::make_tuple(py::none(), freed); };
  KeyWriter w;
  // create_graph changes what fallback nodes return (results that require grad)
  w.tag(create_graph ? 'C' : 'P');
  for (auto gt : py::iter(grad_tensors)) {
    if (gt.is_none()) {
      w.tag('n');
    } else if (!write_tensor(w, gt, bind, ties)) {
      return none();
    }
  }
  for (Py_ssize_t i = 0; i < norder; ++i) {
    py::handle fn = PyList_GET_ITEM(g.order.ptr(), i);
    // user code runs on the gradient mid-sweep: derive anew each call
    if (!hooks_fn.is_none() && py_truthy(hooks_fn(fn))) return py::make_tuple(py::none(), false);
    Spec& spec = spec_of(fn, spec_fn);
    PyObject* nf = g.edges.at(fn.ptr());
    const bool runs = g.runs(fn.ptr());
    // an input or a node the sweep skips; one run through PyTorch's node (only what it
    // returns matters: replay); one lowered
    w.tag(!runs ? 'S' : !spec.lowerable ? 'B' : 'L');
    if (!w.obj(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(fn.ptr()))))) return none();
    const py::object md = metadata_of(fn);
    const py::object metas = node_meta(fn, md);
    if (metas.is_none()) return none();
    w.i64(PyTuple_GET_SIZE(metas.ptr()));
    for (auto part : metas) w.raw(part);
    w.i64(PyTuple_GET_SIZE(nf));
    if (!runs) continue;
    if (spec.holds_saved && is_freed(md, freed_key)) freed = true;
    for (Py_ssize_t j = 0, e = PyTuple_GET_SIZE(nf); j < e; ++j) {
      py::handle edge = PyTuple_GET_ITEM(nf, j);
      py::handle m = PyTuple_GET_ITEM(edge.ptr(), 0);
      py::handle k = PyTuple_GET_ITEM(edge.ptr(), 1);
      if (m.is_none()) {
        w.tag('n');
        continue;
      }
      Py_ssize_t p = position(m);
      if (p >= 0) {
        w.tag('p');
        w.i64(p);
        w.int_of(k);
      } else if (!spec.lowerable) {  // the sweep reads no metadata of an edge leaving the walk
        w.tag('o');                  // from a node it runs through PyTorch
        w.int_of(k);
      } else {
        w.tag('m');
        w.int_of(k);
        const py::object target = node_meta(m, metadata_of(m));
        if (target.is_none()) return none();
        const Py_ssize_t kk = PyLong_AsSsize_t(k.ptr());
        if (kk == -1 && PyErr_Occurred()) throw py::error_already_set();
        if (kk < 0 || kk >= PyTuple_GET_SIZE(target.ptr()))
          throw py::index_error("edge input number out of range of its node's input metadata");
        w.raw(PyTuple_GET_ITEM(target.ptr(), kk));
      }
    }
    if (!spec.lowerable) continue;
    if (spec.region) {
      if (!w.obj(py_attr(fn, N.region))) return none();
      if (!write_each(w, py_attr(fn, N.saved_tensors), "saved_tensors is not a sequence",
                      [&](py::handle v) { return write_value(w, v, bind, ties); }))
        return none();
    } else {
      py::object values;
      if (spec.values_fixed && !md.is_none()) values = node_values(fn, md, spec);
      if (values && values.is_none()) return none();
      if (values) {  // the fixed values, then the tensors
        w.tag('V');
        w.raw(values);
        for (const auto& a : spec.saved_tensors)
          if (!write_value(w, py_attr(fn, a.ptr()), bind, ties)) return none();
      } else {
        for (const auto& a : spec.saved)
          if (!write_value(w, py_attr(fn, a.ptr()), bind, ties)) return none();
      }
    }
  }
  for (py::handle edges : {out_edges, in_edges}) {
    w.tag('E');
    w.i64(PyObject_Length(edges.ptr()));
    for (auto e : py::iter(edges)) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(e);
      w.i64(position(t[0]));
      w.int_of(t[1]);
    }
  }
  return py::make_tuple(w.bytes(), freed);
}

void capture_setup(py::dict dtype_codes, py::object strided, py::tuple device_types,
                   py::object tensor_cls, py::object to_device) {
  if (!N.dtype) {
    N = Names{py_intern("dtype"),         py_intern("layout"),          py_intern("device"),
              py_intern("type"),          py_intern("grad_fn"),         py_intern("requires_grad"),
              py_intern("data_ptr"),      py_intern("shape"),           py_intern("stride"),
              py_intern("output_nr"),     py_intern("next_functions"),  py_intern("variable"),
              py_intern("_input_metadata"), py_intern("metadata"),      py_intern("region"),
              py_intern("saved_tensors"), py_intern("fallback")};
    g_cpu_str = py_intern("cpu");
  }
  Py_XDECREF(g_dtype_codes);
  Py_XDECREF(g_strided);
  Py_XDECREF(g_device_types);
  Py_XDECREF(g_tensor_cls);
  Py_XDECREF(g_to_device);
  g_to_device = to_device.release().ptr();
  g_dtype_codes = dtype_codes.release().ptr();
  g_strided = strided.release().ptr();
  g_device_types = device_types.release().ptr();
  g_tensor_cls = tensor_cls.release().ptr();
  g_specs.clear();
}

}  // namespace fg
