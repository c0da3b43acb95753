// The Python module fastgrad._C (the one pybind11 file). No libtorch: tensors
// arrive as raw data pointers inside an int64 descriptor (see vm.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "call_args.h"
#include "capture.h"
#include "floor.h"
#include "ir_topo.h"
#include "kernel_launch.h"
#include "signature_key.h"
#include "stream_policy.h"
#include "executor.h"
#include "node_hooks.h"
#include "repeat_call.h"
#include "saved_tensors.h"
#include "vm.h"
#ifdef FASTGRAD_WITH_CUDA
#include "cuda_info.h"
#include "vm_cuda.h"
#endif

namespace py = pybind11;

namespace {

// Checks that `b` is a 1-D contiguous buffer of 8-byte items of one of the
// struct-module `codes` (native or little-endian byte order) and returns it.
py::buffer_info request_1d(const py::buffer& b, const char* name, const char* codes) {
  py::buffer_info info = b.request();
  std::string fmt = info.format;
  if (!fmt.empty() && (fmt[0] == '@' || fmt[0] == '=' || fmt[0] == '<')) fmt = fmt.substr(1);
  if (info.itemsize != 8 || fmt.size() != 1 || std::strchr(codes, fmt[0]) == nullptr)
    throw py::value_error(std::string(name) + " must be a buffer of " +
                          (codes[0] == 'd' ? "float64" : "int64") + " (got format '" + info.format +
                          "', itemsize " + std::to_string(info.itemsize) + ")");
  if (info.ndim != 1) throw py::value_error(std::string(name) + " must be 1-dimensional");
  if (info.shape[0] > 1 && info.strides[0] != 8) throw py::value_error(std::string(name) + " must be contiguous");
  return info;
}

void check_compute(int compute_dtype) {
  if (compute_dtype != 0 && compute_dtype != 1)
    throw py::value_error("compute_dtype must be 0 (float32) or 1 (float64), got " + std::to_string(compute_dtype));
}

// Decodes the descriptor both entry points take (ValueError on any fault). `d` and `c` keep the
// buffers alive and pinned while the region runs.
fg::Region parse(const py::buffer& desc, const py::buffer& consts, py::buffer_info& d,
                 py::buffer_info& c) {
  d = request_1d(desc, "desc", "ql");
  c = request_1d(consts, "consts", "d");
  try {
    return fg::parse_region(static_cast<const int64_t*>(d.ptr), d.shape[0],
                            static_cast<const double*>(c.ptr), c.shape[0]);
  } catch (const fg::DescriptorError& e) {
    throw py::value_error(e.what());
  }
}

void run_cpu(const py::buffer& desc, const py::buffer& consts, int compute_dtype, int nthreads) {
  check_compute(compute_dtype);
  if (nthreads < 1) throw py::value_error("nthreads must be >= 1, got " + std::to_string(nthreads));
  py::buffer_info d, c;
  fg::Region region = parse(desc, consts, d, c);
  py::gil_scoped_release nogil;
  fg::run_region_cpu(region, compute_dtype, nthreads);
}

// Row group (vm.h, run_group_cpu): descs, consts and computes hold one entry per region.
int64_t run_cpu_group(const py::sequence& descs, const py::sequence& consts, const py::sequence& computes,
                      int64_t chunk_mask, int nthreads) {
  const size_t n = descs.size();
  if (consts.size() != n || computes.size() != n)
    throw py::value_error("descs, consts and computes must have the same length");
  if (nthreads < 1) throw py::value_error("nthreads must be >= 1, got " + std::to_string(nthreads));
  if (chunk_mask < 0 || chunk_mask >= (int64_t(1) << fg::kMaxNdim))
    throw py::value_error("chunk_mask must be in [0, 2**" + std::to_string(fg::kMaxNdim) + ")");
  std::vector<py::buffer_info> d(n), c(n);
  std::vector<fg::Region> regions;
  std::vector<int> comp(n);
  for (size_t i = 0; i < n; ++i) {
    comp[i] = computes[i].cast<int>();
    check_compute(comp[i]);
    regions.push_back(parse(descs[i].cast<py::buffer>(), consts[i].cast<py::buffer>(), d[i], c[i]));
  }
  py::gil_scoped_release nogil;
  return fg::run_group_cpu(regions, comp, (uint32_t)chunk_mask, nthreads);
}

fg::ProgramHandle make_program(const py::buffer& desc, const py::buffer& consts, int compute_dtype,
                               std::vector<int64_t> load_src, std::vector<int64_t> store_dst,
                               int64_t nins, int64_t nouts) {
  check_compute(compute_dtype);
  py::buffer_info d = request_1d(desc, "desc", "ql"), c = request_1d(consts, "consts", "d");
  try {
    return fg::ProgramHandle{
        std::make_shared<fg::Program>(static_cast<const int64_t*>(d.ptr), d.shape[0],
                                      static_cast<const double*>(c.ptr), c.shape[0], compute_dtype,
                                      std::move(load_src), std::move(store_dst), nins, nouts),
        nins, nouts};
  } catch (const fg::DescriptorError& e) {
    throw py::value_error(e.what());
  }
}

int64_t run_program_group(const py::sequence& progs, const py::sequence& ins, const py::sequence& outs,
                          int64_t chunk_mask, int nthreads) {
  if (chunk_mask < 0 || chunk_mask >= (int64_t(1) << fg::kMaxNdim))
    throw py::value_error("chunk_mask must be in [0, 2**" + std::to_string(fg::kMaxNdim) + ")");
  // Lists hold the items (a generic sequence may build them on access) for the call.
  py::list pl(progs), il(ins), ol(outs);
  std::vector<const fg::ProgramHandle*> ps;
  std::vector<py::handle> hi, ho;
  for (auto p : pl) ps.push_back(&p.cast<const fg::ProgramHandle&>());
  for (auto i : il) hi.push_back(i);
  for (auto o : ol) ho.push_back(o);
  return fg::run_program_group(ps, hi, ho, (uint32_t)chunk_mask, nthreads);
}

#ifdef FASTGRAD_WITH_CUDA
void run_cuda(const py::buffer& desc, const py::buffer& consts, int compute_dtype, int device_index,
              std::uintptr_t stream, bool check_pointers) {
  check_compute(compute_dtype);
  py::buffer_info d, c;
  fg::Region region = parse(desc, consts, d, c);
  // The consts are copied into the kernel's program before this returns.
  // CudaPointerError / DescriptorError derive from std::invalid_argument (ValueError in
  // Python); CUDA failures are std::runtime_error (RuntimeError).
  py::gil_scoped_release nogil;
  fg::run_region_cuda(region, compute_dtype, device_index, stream, check_pointers);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgrad compiled core: fused region evaluator (no libtorch linkage)";

  m.def("run_cpu", &run_cpu, py::arg("desc"), py::arg("consts"), py::arg("compute_dtype"), py::arg("nthreads"),
        "Run one fused region on the CPU.\n\n"
        "desc: int64 buffer (array.array('q')) holding the region descriptor; consts: float64\n"
        "buffer (array.array('d')); compute_dtype: 0 = float32, 1 = float64; nthreads >= 1.\n"
        "Raises ValueError on a malformed descriptor. Releases the GIL while computing.");

  m.def("run_cpu_group", &run_cpu_group, py::arg("descs"), py::arg("consts"), py::arg("computes"),
        py::arg("chunk_mask"), py::arg("nthreads"),
        "Run fused regions in order on the CPU as one row group, chunk by chunk over rows of the\n"
        "leading iteration dims in chunk_mask (bit d = dim d); see csrc/vm.h run_group_cpu for what\n"
        "the caller guarantees. descs/consts/computes: one entry per region, as for run_cpu. Returns the\n"
        "number of chunks run (0: the regions ran one after another). Raises ValueError on a\n"
        "malformed descriptor. Releases the GIL while computing.");

  py::class_<fg::ProgramHandle>(m, "Program",
      "A CPU region parsed once (csrc/program.h); each run reads new data pointers.")
      .def(py::init(&make_program), py::arg("desc"), py::arg("consts"), py::arg("compute_dtype"),
           py::arg("load_src"), py::arg("store_dst"), py::arg("nins"), py::arg("nouts"),
           "desc/consts/compute_dtype as for run_cpu (its pointers are replaced on each run);\n"
           "load_src[i]: which of the nins inputs load i reads, store_dst[k]: which of the nouts\n"
           "outputs store k writes. Raises ValueError on a malformed descriptor.")
      .def("run", [](const fg::ProgramHandle& p, py::sequence ins, py::sequence outs, int nthreads) {
             return fg::run_program(p, ins, outs, nthreads);
           }, py::arg("ins"), py::arg("outs"), py::arg("nthreads"),
           "Run on the CPU over tensors ins and outs (sequences of nins / nouts tensors laid out as\n"
           "the descriptor said: the caller guarantees shapes, strides and dtypes). Returns whether\n"
           "its compiled loop ran (set_kernel; not when a store overlaps a load or another store).\n"
           "Releases the GIL.")
      .def("set_kernel", [](fg::ProgramHandle& p, std::uintptr_t address, py::object keep, int split,
                            bool columns, std::uintptr_t stream_address) {
             if (address != 0 && !p.p->kernel_fits(split))
               throw py::value_error("this program's region cannot run as a compiled loop with split " +
                                     std::to_string(split));
             // A loop adds its sums per row or into columns (jit.source): a run takes the one
             // the region's stores say, so a loop written for the other must not be set.
             if (address != 0 && columns != p.p->column_sums(split))
               throw py::value_error(std::string("this program's sums are ") +
                                     (columns ? "not column sums" : "column sums") + " with split " +
                                     std::to_string(split));
             // Once only: a run (without the GIL) reads the loop, then its split, so the pair
             // must not change under it.
             if (address != 0 && p.p->kernel.load() != nullptr)
               throw py::value_error("this program already runs a compiled loop");
             p.keep = keep;  // (ctypes never unloads a library: a run in an older loop stays valid)
             if (address == 0) {
               p.p->kernel.store(nullptr, std::memory_order_release);
               p.p->stream_kernel.store(nullptr, std::memory_order_release);
               return;
             }
             p.p->split.store(split, std::memory_order_release);
             p.p->reset_stream_pick();
             p.p->stream_kernel.store(reinterpret_cast<fg::Program::Kernel>(stream_address),
                                      std::memory_order_release);
             p.p->kernel.store(reinterpret_cast<fg::Program::Kernel>(address), std::memory_order_release);
           }, py::arg("address"), py::arg("keep"), py::arg("split") = 0, py::arg("columns") = false,
           py::arg("stream_address") = 0,
           "Run through the compiled loop at `address` (void(char* const* ptrs, int64_t begin,\n"
           "int64_t end), over elements with split 0, over rows of dims 0..split-1 otherwise; 0: the\n"
           "interpreter again, not while another thread runs it); `keep` is held as long as it is used\n"
           "(its library); `columns`: the loop adds column sums (jit.source), as column_sums(split)\n"
           "must say; `stream_address`: the same loop writing with streaming stores (or 0), taken for\n"
           "outputs larger than the caches (Program::streams) where timing says it is faster.\n"
           "Raises ValueError for a region kernel_fits(split) refuses, a loop of the other\n"
           "kind of sums, or when a loop is set.")
      .def("load_kinds", [](const fg::ProgramHandle& p, int split) -> py::object {
             std::string kinds;
             if (!p.p->load_kinds(split, kinds)) return py::none();
             return py::str(kinds);
           }, py::arg("split"),
           "How a loop with this split reads each load: a str of 's' (one value), 'c' (contiguous),\n"
           "'r' (one value per row), 'k' (one row for all rows); None when a load fits none.")
      .def("load_dtypes", [](const fg::ProgramHandle& p) {
             py::list out;
             for (const auto& L : p.p->region.loads) out.append(L.dtype);
             return out;
           }, "The storage dtype code of each load (dtypes.def).")
      .def("column_sums", [](const fg::ProgramHandle& p, int split) { return p.p->column_sums(split); },
           py::arg("split"), "Whether its sums are column sums for this split (program.h).")
      .def("kernel_fits", [](const fg::ProgramHandle& p, int split) { return p.p->kernel_fits(split); },
           py::arg("split") = 0, "Whether a compiled loop with this split can compute the region (csrc/program.h).")
      .def_property_readonly("compiled", [](const fg::ProgramHandle& p) { return p.p->kernel.load() != nullptr; },
           "Whether runs go through a compiled loop.")
      .def_property_readonly("streaming", [](const fg::ProgramHandle& p) { return p.p->stream_kernel.load() != nullptr; },
           "Whether its compiled loop has a streaming variant (taken for large outputs: Program::streams).")
      .def_property_readonly("stream_pick", [](const fg::ProgramHandle& p) { return p.p->stream_pick.load(); },
           "Whether its large-output runs stream: 0 while the first runs of each kind are timed,\n"
           "1 streaming stores (timed faster here), -1 plain stores (Program::stream_pick).");

  m.def("run_program_group", &run_program_group, py::arg("programs"), py::arg("ins"), py::arg("outs"),
        py::arg("chunk_mask"), py::arg("nthreads"),
        "run_cpu_group over Programs: ins[i] / outs[i] are the tensors of programs[i] (as for\n"
        "Program.run). Returns the number of chunks run. Releases the GIL while computing.");

  py::class_<fg::Executor>(m, "Executor",
      "A plan's run repeated in C++ for tensors of the same layout (csrc/executor.h).")
      .def(py::init<py::list, py::list, py::list, py::object, py::object, int64_t, py::object, py::object,
                    py::object>(),
           py::arg("leaves"), py::arg("steps"), py::arg("outputs"), py::arg("empty"), py::arg("num_threads"),
           py::arg("parallel_min"), py::arg("grad_enabled"), py::arg("set_grad_enabled"),
           py::arg("stream") = py::none(),
           "See csrc/executor.h for the format of leaves, steps and outputs.")
      .def("run", &fg::Executor::run, py::arg("tensors"),
           "The plan's outputs for the call's tensors, or None when a leaf's layout differs.");

  m.def("hand_fused_sin_exp_grad", &fg::hand_fused_sin_exp_grad, py::arg("x_ptr"), py::arg("out_ptr"), py::arg("n"),
        py::arg("dtype_code"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
        "Reference loop: out[i] = cos(x)*exp(x) + sin(x)*exp(x) over n contiguous elements\n"
        "(dtype_code 0 = float32, 1 = float64), OpenMP over nthreads. Raises ValueError on bad\n"
        "arguments. Releases the GIL.");
  m.def("stream_copy", &fg::stream_copy, py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("nbytes"),
        py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
        "Copy nbytes (a multiple of 64) between 64-byte aligned buffers with streaming stores\n"
        "(the benchmark's second copy bandwidth; floor.h).");

  m.def("opcodes", [] {
    py::dict d;
#define FG_OP(E, N, A) d[N] = (int64_t)fg::OP_##E;
#include "ops.def"
#undef FG_OP
    return d;
  }, "Op name -> opcode, from csrc/ops.def.");

  m.def("op_arities", [] {
    py::dict d;
#define FG_OP(E, N, A) d[N] = A;
#include "ops.def"
#undef FG_OP
    return d;
  }, "Op name -> number of register operands (0 for load/const/iota/store).");

  m.def("dtypes", [] {
    py::dict d;
#define FG_DTYPE(E, N, C, S) d[N] = (int64_t)C;
#include "dtypes.def"
#undef FG_DTYPE
    return d;
  }, "torch dtype name -> storage dtype code, from csrc/dtypes.def.");

  m.def("dtype_storage", [] {
    py::dict d;
#define FG_DTYPE(E, N, C, S) d[py::int_(C)] = #S;
#include "dtypes.def"
#undef FG_DTYPE
    return d;
  }, "Storage dtype code -> its C++ storage type (dtype_convert.h), from csrc/dtypes.def.");

  py::class_<fg::Binder>(m, "Binder", py::dynamic_attr(),
      "Numbers the tensors one call reads (engine._Binder adds __call__).")
      .def(py::init<>())
      .def_readonly("tensors", &fg::Binder::tensors)
      .def_readonly("device", &fg::Binder::device)
      .def_readonly("keys", &fg::Binder::keys,
                    "identity key (Binder::index) -> number, of every tensor bound so far")
      .def("index", [](fg::Binder& b, py::handle t) -> py::tuple {
        py::object key;
        Py_ssize_t n = b.index(t, &key);
        if (n < 0) return py::make_tuple(py::none(), py::none());
        return py::make_tuple(n, key);
      }, py::arg("t"), "(number, identity key) of tensor t, or (None, None) if it cannot be read.")
      .def("record", &fg::Binder::record, py::arg("t"),
           "(number, shape, strides, dtype, requires_grad) of t, or None: its signature record.");
  py::class_<fg::Graph>(m, "Graph", "The nodes of one call's graph walk (capture.h).")
      .def_readonly("order", &fg::Graph::order)
      .def_property_readonly("needed", &fg::Graph::needed)
      .def_readonly("leaf_nodes", &fg::Graph::leaf_nodes)
      .def_property_readonly("nexts", &fg::Graph::nexts)
      .def_readonly("structure", &fg::Graph::structure);
  m.def("ir_topo", &fg::ir_topo, py::arg("roots"), py::arg("stop"), py::arg("stop_known"),
        py::arg("stop_ids"),
        "ir.topo's walk (csrc/ir_topo.h)");
  m.def("collect", &fg::collect, py::arg("out_nodes"), py::arg("input_ids"), py::arg("leaf_ids"),
        py::arg("acc_cls"), "Walk an autograd graph from out_nodes toward the inputs (engine.run).");
  m.def("signature", &fg::signature, py::arg("graph"), py::arg("out_edges"), py::arg("grad_tensors"),
        py::arg("in_edges"), py::arg("bind"), py::arg("create_graph"), py::arg("spec_fn"),
        py::arg("hooks_fn"), py::arg("freed_key"), py::arg("tie_policy"),
        "(signature key or None, whether a node to run was freed): see graph_cache.signature.");
  m.def("clear_interned", &fg::clear_interned,
        "Forget the objects signature keys numbered (graph_cache.clear, with those keys).");
  m.def("interned_count", &fg::interned_count, "How many objects signature keys have numbered.");
  m.def("mark_freed", &fg::mark_freed, py::arg("graph"), py::arg("freed_key"), py::arg("refuse"),
        py::arg("spec_fn"), py::arg("register"), py::arg("pack"), py::arg("unpack"),
        "Mark the nodes a sweep ran as consumed and free their saved tensors (engine._mark_freed).");
  m.def("saved_hooks_in", &fg::saved_hooks_in, py::arg("graph"), py::arg("spec_fn"),
        "Whether a node lowering would read holds a tensor packed by saved-tensor hooks "
        "(engine._capture).");
  m.def("node_hooks_in", &fg::node_hooks_in, py::arg("order"), py::arg("probe"), py::arg("count"),
        "Whether a C++ node of the walk has hooks of its own (hooks.node_hooks_in).");
  m.def("plain_call_args", &fg::plain_call_args,
        "(out_edges, grad_outputs, in_edges) of a plain call, or None (api._fast).");
  m.def("plain_grads", &fg::plain_grads,
        "The grad_outputs of a call whose outputs and grad_outputs need no checks, or None (api._grad).");
  m.def("call_args_setup", &fg::call_args_setup, py::arg("tensor_cls"), py::arg("parameter_cls"),
        py::arg("ones_like"), "Constants plain_call_args reads (once, at import).");
  m.def("repeat_call", &fg::repeat_call, py::arg("outputs"), py::arg("inputs"), py::arg("grad_outputs"),
        py::arg("retain_graph"), py::arg("create_graph"),
        "(results, None) of a call repeated from its cached plan, (None, walk) for engine.hit to\n"
        "take on, or None (csrc/repeat_call.h).");
  m.def("repeat_setup", &fg::repeat_setup, py::arg("engine"), py::arg("graph_cache"), py::arg("runtime"),
        py::arg("hooks"), py::arg("churn"), py::arg("node_view"), py::arg("plan"),
        "The modules repeat_call reads (once, at import: api.py).");
  m.def("capture_setup", &fg::capture_setup, py::arg("dtype_codes"), py::arg("strided"),
        py::arg("device_types"), py::arg("tensor_cls"), py::arg("to_device"),
        "Constants capture reads (once, at import).");

  m.def("build_info", [] {
    py::dict d;
    d["cxx"] = FG_CXX_COMPILER;
    d["cxx_id"] = FG_CXX_COMPILER_ID;
    d["native"] = bool(FG_JIT_NATIVE);
    return d;
  }, "The C++ compiler this module was built with, its id and whether -march=native was used\n"
     "(what fastgrad.jit compiles loops with).");

  m.def("stream_min_bytes", &fg::stream_min_bytes,
        "Outputs of at least this many bytes may be written with streaming stores (stream_policy.h).");
  m.def("set_stream_min_bytes", &fg::set_stream_min_bytes, py::arg("bytes"),
        "Sets stream_min_bytes; a negative value restores the default.");

  m.def("max_ndim", [] { return fg::kMaxNdim; }, "Most iteration dims a region may have.");

  m.def("cuda_bind_driver", [](uintptr_t launch, uintptr_t get_current, uintptr_t push, uintptr_t pop) {
    const fg::DriverCalls before = fg::bind_driver({launch, get_current, push, pop});
    return py::make_tuple(before.launch, before.get_current, before.push, before.pop);
  }, py::arg("launch"), py::arg("get_current"), py::arg("push"), py::arg("pop"),
     "Addresses of cuLaunchKernel, cuCtxGetCurrent, cuCtxPushCurrent_v2, cuCtxPopCurrent_v2\n"
     "(cuda_jit loads the driver); returns the four set before (kernel_launch.h).");
  m.def("cuda_launch", [](uintptr_t func, uintptr_t ctx, unsigned grid, unsigned block, uintptr_t stream,
                          const py::list& params) {
    const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
    std::vector<uint64_t> vals(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      vals[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(params.ptr(), i));
      if (PyErr_Occurred()) throw py::error_already_set();
    }
    return fg::launch_kernel(func, ctx, grid, block, stream, vals.data(), static_cast<int>(n));
  }, py::arg("func"), py::arg("ctx"), py::arg("grid"), py::arg("block"), py::arg("stream"), py::arg("params"),
     "Launch an NVRTC-compiled kernel (cuda_jit.Kernel): grid blocks of block threads on stream,\n"
     "context ctx current, params the 64-bit parameters. Returns the CUresult (0 = success; -1:\n"
     "no driver bound). Does not synchronize.");

#ifdef FASTGRAD_WITH_CUDA
  m.def("run_cuda", &run_cuda, py::arg("desc"), py::arg("consts"), py::arg("compute_dtype"), py::arg("device_index"),
        py::arg("stream"), py::arg("check_pointers") = true,
        "Run one fused region on CUDA device `device_index`, asynchronously on `stream`.\n\n"
        "desc/consts/compute_dtype as for run_cpu, with device pointers of that device in desc;\n"
        "stream: the integer cudaStream_t (torch.cuda.current_stream(dev).cuda_stream; 0 = legacy\n"
        "default stream). Does not synchronize. check_pointers: verify that every data pointer is\n"
        "memory of that device first (a few microseconds). Raises ValueError on a malformed\n"
        "descriptor or a pointer that is not device memory of that device, RuntimeError (with the\n"
        "CUDA error text) when CUDA or the device is unavailable or a launch fails. Releases the GIL.");
  m.def("cuda_compiled", [] { return true; });
  m.def("cuda_device_count", [] { return fg::cuda_device_count(nullptr); });
  m.def("cuda_status", [] {
    std::string reason;
    const int n = fg::cuda_device_count(&reason);
    return "compiled with CUDA " + fg::cuda_runtime_version() + "; " + std::to_string(n) +
           " device(s) (" + reason + ")";
  });
#else
  m.def("run_cuda", [](py::args, py::kwargs) {
    throw std::runtime_error("fastgrad run_cuda: fastgrad was not compiled with CUDA (no CUDA compiler at build "
                             "time, or FASTGRAD_CUDA=OFF)");
  }, "Unavailable: this build has no CUDA support (always raises RuntimeError).");
  m.def("cuda_compiled", [] { return false; });
  m.def("cuda_device_count", [] { return 0; });
  m.def("cuda_status", [] { return std::string("not compiled with CUDA (no CUDA compiler at build time, or FASTGRAD_CUDA=OFF)"); });
#endif
}
