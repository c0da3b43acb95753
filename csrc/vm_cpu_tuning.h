// Tuning of the CPU interpreter (vm_cpu.cpp): when to use threads, how
// finely to split work among them, and how long a block is (register-file
// budget, blocks of programs with transcendental ops, streaming threshold,
// row-group chunks).
//
// Internal to the CPU VM: included only from vm_cpu.cpp (one translation
// unit, its compile flags; hence the anonymous namespace).
#pragma once
#include <algorithm>
#include <cstdint>
#include "region_extents.h"  // region_bytes
#include "vm.h"

namespace fg {
namespace {

// Below this many elements a region runs on the calling thread only: the
// cost of waking a thread team exceeds the work.
constexpr int64_t kParallelMin = 32768;
// Elementwise regions are cut into about this many chunks per thread.
constexpr int64_t kChunksPerThread = 16;
// Register file budget per thread; the block length follows from it so that
// the live registers of a program stay in L1/L2.
constexpr int64_t kRegBytes = 64 * 1024;
// Longest block (elements), and the blocks of programs with transcendental
// ops whose data streams from memory / fits in cache (see run_typed).
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kHeavyBlock = 256;
constexpr int64_t kHeavyCachedBlock = 1024;
// Bytes a region reads and writes above which it is taken to stream from
// memory rather than from cache (measured crossover: between 2.4 and 8 MB).
constexpr double kStreamBytes = 4.0 * 1024 * 1024;
constexpr int64_t kMaxOuterBlock = 16384;
// Row groups (vm_cpu_group.h): the bytes one chunk of the group's largest
// pass reads and writes, so that what the first pass read is still in L2
// when the next pass reads it again; slices larger than kGroupMaxSliceBytes
// cannot be kept in cache, so such groups run pass by pass.
constexpr int64_t kGroupChunkBytes = 256 * 1024;
constexpr int64_t kGroupMaxSliceBytes = 4 * kGroupChunkBytes;
// A load broadcast along the innermost dim is read once per run by the ops
// that use it (instead of filled into a register) when a run is at least
// this long.
constexpr int64_t kBcastMinRun = 16;
// Row groups hand out consecutive rows in about this many spans per thread.
constexpr int64_t kGroupSpansPerThread = 8;

// Ops that cost tens of cycles per element (libm / libmvec calls).
inline bool is_heavy(int64_t op) {
  switch (op) {
    case OP_EXP: case OP_LOG: case OP_SIN: case OP_COS: case OP_TANH: case OP_SIGMOID:
    case OP_LOG1P: case OP_EXPM1: case OP_POW:
      return true;
    default:
      return false;
  }
}

// A program with an op that is_heavy.
inline bool region_heavy(const Region& r) {
  bool heavy = false;
  for (const Instr& I : r.instrs) heavy |= is_heavy(I.op);
  return heavy;
}

// The bytes r reads and writes exceed kStreamBytes (it streams from memory).
inline bool region_streaming(const Region& r) { return region_bytes(r) > kStreamBytes; }

// Block length (elements) of normalised region r with registers of
// `reg_size` bytes: programs with a transcendental op are compute-bound, and
// run short blocks while prefetching the next block's contiguous inputs and
// outputs, so memory traffic overlaps the math (a long burst of misses would
// stall it, as would a long burst of stores). Memory-bound programs run long
// blocks (less per-block overhead) and leave streaming to the hardware
// prefetcher. (Data that fits in cache needs no prefetching: then longer
// blocks win.)
inline int64_t block_length(const Region& r, int64_t reg_size, bool heavy, bool streaming) {
  const int64_t nregs = std::max<int64_t>(r.nregs, 1);
  const int64_t max_block = heavy ? (streaming ? kHeavyBlock : kHeavyCachedBlock) : kMaxBlock;
  int64_t block = kRegBytes / (nregs * reg_size);
  block = std::max<int64_t>(64, std::min<int64_t>(max_block, block)) & ~int64_t(15);
  // A column sum (outer strategy, rows of the innermost dim reduced) adds
  // several rows per pass over its accumulators: let a block hold 4 rows.
  if (!heavy && r.red_outer && r.ndim >= 2 && r.ostride[r.ndim - 2] == 0 && r.ostride[r.ndim - 1] == 1)
    block = std::max(block, std::min({4 * r.shape[r.ndim - 1], kMaxOuterBlock,
                                      4 * kRegBytes / (nregs * reg_size)}) & ~int64_t(15));
  return block;
}

}  // namespace
}  // namespace fg
