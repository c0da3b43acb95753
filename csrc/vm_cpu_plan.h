// The register-pointer fast paths' plan for the CPU interpreter (vm_cpu.cpp):
// which loads can be read in place and which instruction results can be
// computed straight into an output, decided once per region, and off when
// a store may overlap a load or another store (byte extents of records);
// which passes read their values where they are (plan_direct_reads); which
// stores stream (set by row groups, vm_cpu_group.h).
//
// Internal to the CPU VM: included only by vm_cpu.cpp (one translation unit,
// its compile flags; hence the anonymous namespace).
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>
#include "region_extents.h"  // stores_disjoint
#include "vm.h"
#include "vm_cpu_tuning.h"

namespace fg {
namespace {

// What run_typed decides once per region for the register-pointer fast
// paths (see Worker::exec_block).
struct FastPlan {
  bool enabled = false;             // no store overlaps a load or another store
  bool prefetch = false;            // prefetch the next block of contiguous loads / redirected stores
  std::vector<int> load_ck;         // per load: innermost dims over which it is contiguous (-1: not eligible)
  std::vector<int64_t> load_span;   // per load: elements spanned by those dims
  std::vector<int> store_ck;        // same for stores (assign, compute dtype only)
  std::vector<int64_t> store_span;
  std::vector<int> redirect;        // per instruction: store record its result may be written into, or -1
  std::vector<char> stream;         // per store (empty: none): contiguous blocks go out with streaming stores
  // Passes over a block saved by reading values where they are:
  std::vector<char> skip;           // per instruction: not executed (its result is read as below)
  std::vector<int> bcast;           // per instruction: a binary op whose operand a (1) or b (2) is, per run of
                                    // the innermost dim, one value of a load broadcast along it, else 0
  std::vector<int> bcast_load;      // per instruction: that load record
  std::vector<int> dot;             // per store: the MUL instruction whose products this sum store adds, or -1
  std::vector<int> cst;             // per instruction: a binary op whose operand a (1) or b (2) is a constant
  std::vector<double> cst_val;      // per instruction: that constant
};

// Store k (contiguous, of the compute dtype: store_ck[k] >= 0) is written
// with streaming stores, by the instruction redirected into it or by the
// store itself.
inline void stream_store(FastPlan& fp, int k) {
  if (!fp.enabled || fp.store_ck[k] < 0) return;
  fp.stream.resize(fp.store_ck.size(), 0);
  fp.stream[k] = 1;
}

// Innermost dims over which a record (strides st) is contiguous: -1 if
// none, and the number of elements those dims span.
inline int contig_dims(const Region& r, const int64_t* st, int64_t* span) {
  int64_t expect = 1;
  int k = 0;
  for (int d = r.ndim - 1; d >= 0; --d, ++k) {
    if (r.shape[d] == 1) continue;
    if (st[d] != expect) break;
    expect *= r.shape[d];
  }
  *span = std::max<int64_t>(expect, 1);
  return k == 0 ? -1 : k;
}

// Which operands of instruction J read register `reg`: bit 0 a, bit 1 b,
// bit 2 c (a store reads its b).
inline int reads_reg(const Instr& J, int64_t reg) {
  if (J.op == OP_STORE) return J.b == reg ? 2 : 0;
  if (J.op == OP_LOAD || J.op == OP_CONST || J.op == OP_IOTA) return 0;
  const int ar = kOpArity[J.op];
  return (J.a == reg ? 1 : 0) | (ar >= 2 && J.b == reg ? 2 : 0) | (ar >= 3 && J.c == reg ? 4 : 0);
}

// The instructions that read instruction i's result (until its register is
// written again), with the operands they read it as.
inline std::vector<std::pair<size_t, int>> readers_of(const Region& r, size_t i) {
  std::vector<std::pair<size_t, int>> out;
  const int64_t reg = r.instrs[i].dst;
  for (size_t j = i + 1; j < r.instrs.size(); ++j) {
    const Instr& J = r.instrs[j];
    if (const int m = reads_reg(J, reg)) out.emplace_back(j, m);
    if (J.op != OP_STORE && J.dst == reg) break;
  }
  return out;
}

// Two passes over a block that can read their values where they are:
//  - a load of the compute dtype broadcast along the innermost dim (a row
//    sum read back over the row), read only as one operand of binary ops,
//    is not filled into a register: those ops read its one value per run;
//  - a product read only by a sum store (rows strategy) is not written to a
//    register: the store adds the products of the MUL's operands, each
//    rounded as the MUL would (seg_dot), in the order it would add them.
//  - a constant read only as one operand of binary ops is not filled into a
//    register either: those ops take it as a scalar.
// All give the values the plain program gives.
inline void plan_direct_reads(const Region& r, int compute_dtype, FastPlan& fp) {
  const size_t ni = r.instrs.size(), ns = r.stores.size();
  const int nd = r.ndim;
  fp.skip.assign(ni, 0);
  fp.bcast.assign(ni, 0);
  fp.bcast_load.assign(ni, -1);
  fp.dot.assign(ns, -1);
  for (size_t i = 0; i < ni; ++i) {
    const Instr& I = r.instrs[i];
    if (I.op != OP_LOAD || fp.redirect[i] >= 0 || nd < 1) continue;
    const LoadRec& L = r.loads[I.a];
    if (L.dtype != compute_dtype || !L.preds.empty() || L.stride[nd - 1] != 0 || r.shape[nd - 1] < kBcastMinRun)
      continue;
    const auto rd = readers_of(r, i);
    bool ok = !rd.empty();
    for (const auto& [j, m] : rd) {
      const Instr& J = r.instrs[j];
      ok = ok && J.op != OP_STORE && kOpArity[J.op] == 2 && (m == 1 || m == 2) && fp.bcast[j] == 0;
    }
    if (!ok) continue;
    fp.skip[i] = 1;
    for (const auto& [j, m] : rd) {
      fp.bcast[j] = m;
      fp.bcast_load[j] = (int)I.a;
    }
  }
  fp.cst.assign(ni, 0);
  fp.cst_val.assign(ni, 0.0);
  for (size_t i = 0; i < ni; ++i) {
    const Instr& I = r.instrs[i];
    if (I.op != OP_CONST || fp.redirect[i] >= 0) continue;
    const auto rd = readers_of(r, i);
    bool ok = !rd.empty();
    for (const auto& [j, m] : rd) {
      const Instr& J = r.instrs[j];
      ok = ok && J.op != OP_STORE && kOpArity[J.op] == 2 && (m == 1 || m == 2) && fp.bcast[j] == 0 &&
           fp.cst[j] == 0;
    }
    if (!ok) continue;
    fp.skip[i] = 1;
    for (const auto& [j, m] : rd) {
      fp.cst[j] = m;
      fp.cst_val[j] = r.consts[I.a];
    }
  }
  if (r.red_outer) return;
  for (size_t j = 0; j < ni; ++j) {
    const Instr& S = r.instrs[j];
    if (S.op != OP_STORE || r.stores[S.a].mode != MODE_SUM) continue;
    size_t i = j;
    while (i-- > 0 && !(r.instrs[i].op != OP_STORE && r.instrs[i].dst == S.b)) {}
    if (i >= j) continue;
    const Instr& M = r.instrs[i];
    if (M.op != OP_MUL || M.dst == M.a || M.dst == M.b || fp.bcast[i] || fp.cst[i] || fp.skip[i] ||
        fp.redirect[i] >= 0 ||
        readers_of(r, i).size() != 1)
      continue;
    bool kept = true;  // the MUL's operands still hold their values at the store
    for (size_t q = i + 1; q < j; ++q)
      kept = kept && (r.instrs[q].op == OP_STORE || (r.instrs[q].dst != M.a && r.instrs[q].dst != M.b));
    if (!kept) continue;
    fp.skip[i] = 1;
    fp.dot[S.a] = (int)i;
  }
}

// Decides the register-pointer fast paths (Worker). They change when memory
// is read and written within a block, so they are off when a store may
// overlap a load or another store.
FastPlan make_fast_plan(const Region& r, int compute_dtype) {
  FastPlan fp;
  if (!stores_disjoint(r)) return fp;
  const size_t nl = r.loads.size(), ns = r.stores.size();
  fp.enabled = true;
  fp.load_ck.assign(nl, -1);
  fp.load_span.assign(nl, 1);
  fp.store_ck.assign(ns, -1);
  fp.store_span.assign(ns, 1);
  for (size_t i = 0; i < nl; ++i) {
    const LoadRec& L = r.loads[i];
    if (L.dtype == compute_dtype && L.preds.empty()) fp.load_ck[i] = contig_dims(r, L.stride, &fp.load_span[i]);
  }
  for (size_t k = 0; k < ns; ++k) {
    const StoreRec& S = r.stores[k];
    if (S.dtype == compute_dtype && S.mode == MODE_ASSIGN) fp.store_ck[k] = contig_dims(r, S.stride, &fp.store_span[k]);
  }
  // A stored register's value is computed straight into the store's output
  // by the last instruction that writes the register before the store.
  const size_t ni = r.instrs.size();
  fp.redirect.assign(ni, -1);
  for (size_t j = 0; j < ni; ++j) {
    const Instr& S = r.instrs[j];
    if (S.op != OP_STORE || fp.store_ck[S.a] < 0) continue;
    for (size_t i = j; i-- > 0;) {
      const Instr& I = r.instrs[i];
      if (I.op == OP_STORE || I.dst != S.b) continue;
      if (fp.redirect[i] < 0) fp.redirect[i] = (int)S.a;
      break;
    }
  }
  plan_direct_reads(r, compute_dtype, fp);
  return fp;
}

}  // namespace
}  // namespace fg
