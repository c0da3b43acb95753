#include "executor.h"

#include "kernel_launch.h"
#include "py_calls.h"

#include <algorithm>
#include <optional>
#include <string>

namespace fg {
namespace {

struct Names {
  PyObject *data_ptr = py_intern("data_ptr"), *shape = py_intern("shape"), *stride = py_intern("stride"),
           *reshape = py_intern("reshape"), *expand = py_intern("expand"),
           *dtype = py_intern("dtype"), *device = py_intern("device"), *t = py_intern("t"),
           *mm = py_intern("mm");
};
const Names& names() {
  static const Names* n = new Names();  // never destroyed: may outlive the interpreter
  return *n;
}

// Data pointers (data_ptr()) of a sequence of exactly `need` tensors.
std::vector<char*> data_ptrs(py::handle seq, int64_t need, const char* what) {
  const py::object keep = py_fast(seq, "expected a sequence of tensors");
  PyObject* fast = keep.ptr();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  if (n != need)
    throw py::value_error(std::string(what) + ": expected " + std::to_string(need) + " tensors, got " +
                          std::to_string(n));
  std::vector<char*> ps(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    py::object r = py_call(PySequence_Fast_GET_ITEM(fast, i), names().data_ptr);
    ps[i] = reinterpret_cast<char*>(PyLong_AsVoidPtr(r.ptr()));
    if (PyErr_Occurred()) throw py::error_already_set();
  }
  return ps;
}

// Grad mode off for a scope, restored after (also when an exception leaves it).
struct GradOff {
  PyObject* set;
  bool prev;
  GradOff(py::handle enabled, py::handle set_) : set(set_.ptr()) {
    PyObject* r = PyObject_CallNoArgs(enabled.ptr());
    if (!r) throw py::error_already_set();
    prev = r == Py_True;
    Py_DECREF(r);
    call(false);
  }
  ~GradOff() {
    PyObject* r = PyObject_CallOneArg(set, prev ? Py_True : Py_False);
    if (r) Py_DECREF(r); else PyErr_Clear();
  }
  void call(bool on) {
    PyObject* r = PyObject_CallOneArg(set, on ? Py_True : Py_False);
    if (!r) throw py::error_already_set();
    Py_DECREF(r);
  }
};

Region bind(const ProgramHandle& p, py::handle ins, py::handle outs) {
  std::vector<char*> pi = data_ptrs(ins, p.nins, "Program inputs");
  std::vector<char*> po = data_ptrs(outs, p.nouts, "Program outputs");
  return p.p->bind(pi.data(), po.data());
}

}  // namespace

bool run_program(const ProgramHandle& p, py::handle ins, py::handle outs, int nthreads) {
  if (nthreads < 1) throw py::value_error("nthreads must be >= 1, got " + std::to_string(nthreads));
  Region r = bind(p, ins, outs);
  py::gil_scoped_release nogil;
  return p.p->run(r, nthreads);
}

int64_t run_program_group(const std::vector<const ProgramHandle*>& programs,
                          const std::vector<py::handle>& ins, const std::vector<py::handle>& outs,
                          uint32_t chunk_mask, int nthreads) {
  const size_t n = programs.size();
  if (ins.size() != n || outs.size() != n)
    throw py::value_error("programs, inputs and outputs must have the same length");
  if (nthreads < 1) throw py::value_error("nthreads must be >= 1, got " + std::to_string(nthreads));
  std::vector<Region> regions;
  std::vector<int> comp(n);
  std::vector<const Program*> ps(n);
  for (size_t i = 0; i < n; ++i) {
    regions.push_back(bind(*programs[i], ins[i], outs[i]));
    comp[i] = programs[i]->p->compute;
    ps[i] = programs[i]->p.get();
  }
  py::gil_scoped_release nogil;
  const int64_t chunks = run_group_loops(ps, regions, chunk_mask, nthreads);
  return chunks >= 0 ? chunks : run_group_cpu(regions, comp, chunk_mask, nthreads);
}

int Executor::slot_of(py::handle s, const char* what) const {
  const int slot = s.cast<int>();
  if (slot < 0 || (size_t)slot >= nslots_)
    throw py::value_error(std::string("Executor: ") + what + " out of range");
  return slot;
}

Executor::Part Executor::part_of(py::handle spec) {
  py::tuple t = py::reinterpret_borrow<py::tuple>(spec);
  Part part;
  part.program = py::reinterpret_borrow<py::object>(t[0]);
  part.prog = &part.program.cast<const ProgramHandle&>();
  for (auto s : t[1]) part.in.push_back(slot_of(s, "input slot"));
  if ((int64_t)part.in.size() != part.prog->nins) throw py::value_error("Executor: one input slot per Program input");
  for (auto o : t[2]) part.outs.push_back(alloc_of(o));
  if ((int64_t)part.outs.size() != part.prog->nouts) throw py::value_error("Executor: one output spec per Program output");
  nslots_ += part.outs.size();
  return part;
}

Executor::Part Executor::cuda_part_of(py::handle spec) {
  py::tuple t = py::reinterpret_borrow<py::tuple>(spec);
  Part part;
  for (auto s : t[0]) part.in.push_back(slot_of(s, "load slot"));
  for (auto o : t[1]) part.outs.push_back(alloc_of(o));
  nslots_ += part.outs.size();  // (a later part may load them)
  return part;
}

Executor::Alloc Executor::alloc_of(py::handle spec) {
  py::tuple t = py::reinterpret_borrow<py::tuple>(spec);
  Alloc a;
  a.args = py::tuple(t[0]);
  a.kwargs[names().dtype] = t[1];
  if (t.size() > 2) a.kwargs[names().device] = t[2];
  return a;
}

Executor::Executor(py::list leaves, py::list steps, py::list outputs, py::object empty,
                   py::object num_threads, int64_t parallel_min, py::object grad_enabled,
                   py::object set_grad_enabled, py::object stream)
    : empty_(std::move(empty)), num_threads_(std::move(num_threads)),
      grad_enabled_(std::move(grad_enabled)), set_grad_enabled_(std::move(set_grad_enabled)),
      stream_(std::move(stream)), parallel_min_(parallel_min) {
  for (auto l : leaves) {
    py::tuple t = py::reinterpret_borrow<py::tuple>(l);
    leaves_.push_back(Leaf{t[0].cast<Py_ssize_t>(), py::tuple(t[1]), py::tuple(t[2]),
                           t[3].is_none() ? py::object(py::none()) : py::object(py::tuple(t[3]))});
  }
  nslots_ = leaves_.size();
  for (auto s : steps) {
    py::tuple t = py::reinterpret_borrow<py::tuple>(s);
    Step st;
    st.kind = t[0].cast<int>();
    if (st.kind == 0) {
      st.parts.push_back(part_of(t[1]));
      st.numel = t[2].cast<int64_t>();
    } else if (st.kind == 1) {
      for (auto p : t[1]) st.parts.push_back(part_of(p));
      st.mask = t[2].cast<uint32_t>();
      st.numel = t[3].cast<int64_t>();
    } else if (st.kind == 2) {
      st.src = slot_of(t[1], "view source");
      for (auto c : t[2]) {
        py::tuple ct = py::reinterpret_borrow<py::tuple>(c);
        st.chain.emplace_back(ct[0].cast<bool>(), py::tuple(ct[1]));
      }
      nslots_ += 1;
    } else if (st.kind == 3) {
      py::tuple src(t[1]), tr(t[2]);
      if (src.size() != 2 || tr.size() != 2) throw py::value_error("Executor: a product takes two operands");
      for (int i = 0; i < 2; ++i) {
        st.operands[i] = slot_of(src[i], "product operand");
        st.transposed[i] = tr[i].cast<bool>();
      }
      nslots_ += 1;
    } else if (st.kind == 5) {
      py::tuple src(t[2]);
      if (src.size() != 2) throw py::value_error("Executor: a call step takes two operands");
      st.fn = py::reinterpret_borrow<py::object>(t[1]);
      for (int i = 0; i < 2; ++i) st.operands[i] = slot_of(src[i], "call operand");
      nslots_ += 1;
    } else if (st.kind == 4) {
      py::tuple k(t[1]);
      if (k.size() != 4) throw py::value_error("Executor: a kernel is (func, ctx, grid, block)");
      st.launch = Launch{k[0].cast<uintptr_t>(), k[1].cast<uintptr_t>(), k[2].cast<unsigned>(),
                         k[3].cast<unsigned>()};
      if (stream_.is_none()) throw py::value_error("Executor: a CUDA step needs stream");
      for (auto p : t[2]) st.parts.push_back(cuda_part_of(p));
    } else {
      throw py::value_error("Executor: unknown step kind " + std::to_string(st.kind));
    }
    views_or_products_ = views_or_products_ || st.kind == 2 || st.kind == 3 || st.kind == 5;
    steps_.push_back(std::move(st));
  }
  for (auto o : outputs) outputs_.push_back(slot_of(o, "output slot"));
}

int Executor::threads_for(int64_t numel, int& nthreads) const {
  if (numel < parallel_min_) return 1;
  if (nthreads == 0) nthreads = std::max(1, num_threads_().cast<int>());  // once per run
  return nthreads;
}

void Executor::launch(const Step& st, std::vector<py::object>& slots, uintptr_t stream) const {
  const Names& N = names();
  std::vector<uint64_t> params;
  auto ptr = [&](py::handle t) {
    py::object r = py_call(t, N.data_ptr);
    params.push_back(PyLong_AsUnsignedLongLong(r.ptr()));
    if (PyErr_Occurred()) throw py::error_already_set();
  };
  for (const Part& p : st.parts) {
    for (int s : p.in) ptr(slots[s]);
    for (const Alloc& a : p.outs) {
      PyObject* o = PyObject_Call(empty_.ptr(), a.args.ptr(), a.kwargs.ptr());
      if (!o) throw py::error_already_set();
      slots.push_back(py::reinterpret_steal<py::object>(o));
      ptr(slots.back());
    }
  }
  const Launch& k = st.launch;
  const int r = launch_kernel(k.func, k.ctx, k.grid, k.block, stream, params.data(),
                              static_cast<int>(params.size()));
  if (r) throw std::runtime_error("cuLaunchKernel: CUDA error " + std::to_string(r));
}

py::object Executor::run(py::handle tensors) const {
  const Names& N = names();
  std::vector<py::object> slots;
  slots.reserve(nslots_);
  for (const Leaf& l : leaves_) {
    PyObject* t = PySequence_GetItem(tensors.ptr(), l.index);
    if (!t) throw py::error_already_set();
    py::object tt = py::reinterpret_steal<py::object>(t);
    if (!py_equal(py_attr(tt, N.shape), l.shape) || !py_equal(py_call(tt, N.stride), l.strides))
      return py::none();
    if (!l.reshape.is_none()) tt = py_call(tt, N.reshape, l.reshape.ptr());
    slots.push_back(std::move(tt));
  }
  // Views and products are taken with grad mode off (one switch for the run: the regions
  // between them do not read it)
  std::optional<GradOff> off;
  if (views_or_products_) off.emplace(grad_enabled_, set_grad_enabled_);
  int nthreads = 0;
  std::optional<uintptr_t> stream;  // read at the first CUDA step
  for (const Step& st : steps_) {
    if (st.kind == 4) {
      if (!stream) stream = stream_().cast<uintptr_t>();
      launch(st, slots, *stream);
      continue;
    }
    if (st.kind == 2) {
      py::object v = slots[st.src];
      for (const auto& [is_expand, shape] : st.chain)
        v = py_call(v, is_expand ? N.expand : N.reshape, shape.ptr());
      slots.push_back(std::move(v));
      continue;
    }
    if (st.kind == 5) {
      slots.push_back(st.fn(slots[st.operands[0]], slots[st.operands[1]]));
      continue;
    }
    if (st.kind == 3) {
      py::object ab[2];
      for (int i = 0; i < 2; ++i)
        ab[i] = st.transposed[i] ? py_call(slots[st.operands[i]], N.t) : slots[st.operands[i]];
      slots.push_back(py_call(ab[0], N.mm, ab[1].ptr()));
      continue;
    }
    std::vector<py::list> ins, outs;
    for (const Part& p : st.parts) {
      py::list in(p.in.size()), out(p.outs.size());
      for (size_t i = 0; i < p.in.size(); ++i) in[i] = slots[p.in[i]];
      for (size_t k = 0; k < p.outs.size(); ++k) {
        PyObject* o = PyObject_Call(empty_.ptr(), p.outs[k].args.ptr(), p.outs[k].kwargs.ptr());
        if (!o) throw py::error_already_set();
        out[k] = py::reinterpret_steal<py::object>(o);
        slots.push_back(out[k]);
      }
      ins.push_back(std::move(in));
      outs.push_back(std::move(out));
    }
    const int nt = threads_for(st.numel, nthreads);
    if (st.kind == 0) {
      run_program(*st.parts[0].prog, ins[0], outs[0], nt);
    } else {
      std::vector<const ProgramHandle*> progs;
      std::vector<py::handle> hi, ho;
      for (size_t i = 0; i < st.parts.size(); ++i) {
        progs.push_back(st.parts[i].prog);
        hi.push_back(ins[i]);
        ho.push_back(outs[i]);
      }
      run_program_group(progs, hi, ho, st.mask, nt);
    }
  }
  py::list res(outputs_.size());
  for (size_t i = 0; i < outputs_.size(); ++i) res[i] = slots[outputs_[i]];
  return std::move(res);
}

}  // namespace fg
