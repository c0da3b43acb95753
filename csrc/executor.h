// The cache-hit path in C++: run a plan's steps over a call's tensors.
//
// On small graphs the Python around each region (allocating outputs, reading data pointers,
// looking up the descriptor for the inputs' layout) cost more than the region itself. An
// Executor is built in Python (runtime.py) from one run of a plan without create_graph: on
// the CPU with the Programs that run used, on a GPU once every region ran a compiled kernel
// (the Python between a call's signature and its launch was about a fifth of a small call's
// host time there). It then repeats that run for later calls whose tensors have the same
// layout, and declines (returns None) when they do not. It talks to tensors only through
// Python calls (torch.empty, data_ptr, stride, ...): no libtorch.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <vector>

#include "program.h"

namespace fg {
namespace py = pybind11;

// A Program and the number of tensors each run takes (what _C.Program is in Python).
struct ProgramHandle {
  std::shared_ptr<Program> p;
  int64_t nins = 0, nouts = 0;
  py::object keep;  // what keeps p->kernel's code loaded (a ctypes library), if any
};

// Run on tensors ins / outs (sequences of nins / nouts tensors laid out as the descriptor said);
// releases the GIL while computing. Returns whether the compiled loop ran (Program::run).
bool run_program(const ProgramHandle& p, py::handle ins, py::handle outs, int nthreads);
// run_group_cpu over programs[i] on ins[i] / outs[i]; returns the number of chunks run.
int64_t run_program_group(const std::vector<const ProgramHandle*>& programs,
                          const std::vector<py::handle>& ins, const std::vector<py::handle>& outs,
                          uint32_t chunk_mask, int nthreads);

class Executor {
 public:
  // leaves: [(index in the call's tensors, shape, strides, shape to reshape to or None)],
  // slots 0..L-1;
  // steps, each adding slots for what it produces, in order:
  //   (0, region, numel)                  region = (Program, [input slots], [(shape, dtype)])
  //   (1, [region, ...], chunk_mask, numel)  a row group
  //   (2, source slot, [(is_expand, shape), ...])  reshape / expand with grad mode off (as
  //      PyTorch's engine takes them in a backward without create_graph)
  //   (3, (slot a, slot b), (transpose a, transpose b))  a.mm(b), each operand or its
  //      transpose (a view), with grad mode off
  //   (5, fn, (slot a, slot b))  fn(a, b) with grad mode off: a step PyTorch runs whose
  //      arguments are tensors (plan_steps.IndexStep.run: a gather or scatter of rows)
  //   (4, (func, ctx, grid, block), [([load slots], [(shape, dtype, device)]), ...])  one
  //      compiled CUDA kernel (cuda_jit.Kernel) over one region or a row group's regions:
  //      each part's targets allocated, then launched (kernel_launch.h) with each part's
  //      loads' data pointers, then its targets', on the stream stream() returns
  // outputs: [slot]. empty: torch.empty; num_threads: torch.get_num_threads; a step of fewer
  // than parallel_min elements runs on one thread; grad_enabled / set_grad_enabled:
  // torch.is_grad_enabled / torch._C._set_grad_enabled; stream: the current CUDA stream of the
  // kernels' device (called once per run that launches), or None.
  Executor(py::list leaves, py::list steps, py::list outputs, py::object empty,
           py::object num_threads, int64_t parallel_min, py::object grad_enabled,
           py::object set_grad_enabled, py::object stream);
  // The plan's outputs (a list) for the call's tensors, or None when a leaf's shape or
  // strides differ from those the Executor was built for.
  py::object run(py::handle tensors) const;

 private:
  struct Leaf {
    Py_ssize_t index;
    py::object shape, strides, reshape;  // reshape: None, or the shape the plan reads it as
  };
  struct Alloc {
    py::tuple args;  // the sizes
    py::dict kwargs;  // dtype
  };
  struct Part {
    py::object program;  // keeps `prog` alive
    const ProgramHandle* prog = nullptr;  // (none in a CUDA step)
    std::vector<int> in;  // a CUDA step's: the slot each load reads
    std::vector<Alloc> outs;
  };
  struct Launch {  // a CUDA step's kernel
    uintptr_t func = 0, ctx = 0;
    unsigned grid = 0, block = 0;
  };
  struct Step {
    int kind;
    std::vector<Part> parts;
    uint32_t mask = 0;
    int64_t numel = 0;
    int src = 0;
    std::vector<std::pair<bool, py::object>> chain;
    int operands[2] = {0, 0};
    bool transposed[2] = {false, false};
    Launch launch;
    py::object fn;  // kind 5: the step's own run, over the operands' slots
  };
  std::vector<Leaf> leaves_;
  std::vector<Step> steps_;
  std::vector<int> outputs_;
  py::object empty_, num_threads_, grad_enabled_, set_grad_enabled_, stream_;
  int64_t parallel_min_;
  size_t nslots_ = 0;
  bool views_or_products_ = false;  // some step is a view or a product (grad mode off)

  // s as a slot number that steps so far have filled (ValueError "<what> out of range" if not).
  int slot_of(py::handle s, const char* what) const;
  Part part_of(py::handle spec);
  Part cuda_part_of(py::handle spec);
  Alloc alloc_of(py::handle spec);
  // A CUDA step (kind 4): its targets allocated into slots, its kernel launched on stream.
  void launch(const Step& st, std::vector<py::object>& slots, uintptr_t stream) const;
  // Threads for a step of numel elements; nthreads: the run's thread count once read (0 before)
  int threads_for(int64_t numel, int& nthreads) const;
};

}  // namespace fg
