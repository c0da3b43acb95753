// Tuning of the CPU interpreter (vm_cpu.cpp): when to use threads, how
// finely to split work among them, and how long a block is (register-file
// budget, blocks of programs with transcendental ops, streaming threshold).
//
// Internal to the CPU VM: included only from vm_cpu.cpp (one translation
// unit, its compile flags; hence the anonymous namespace).
#pragma once
#include <cstdint>
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

}  // namespace
}  // namespace fg
