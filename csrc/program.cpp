#include "program.h"

#include <string>

namespace fg {

Program::Program(const int64_t* desc, int64_t len, const double* c, int64_t nconsts, int compute_,
                 std::vector<int64_t> load_src_, std::vector<int64_t> store_dst_, int64_t nins,
                 int64_t nouts)
    : consts(c, c + nconsts), load_src(std::move(load_src_)), store_dst(std::move(store_dst_)),
      compute(compute_) {
  if (compute != 0 && compute != 1)
    throw DescriptorError("fastgrad program: compute must be 0 (float32) or 1 (float64)");
  region = parse_region(desc, len, consts.data(), nconsts);
  if (load_src.size() != region.loads.size() || store_dst.size() != region.stores.size())
    throw DescriptorError("fastgrad program: one source per load and one destination per store");
  for (int64_t s : load_src)
    if (s < 0 || s >= nins) throw DescriptorError("fastgrad program: load source " + std::to_string(s) + " out of range");
  for (int64_t s : store_dst)
    if (s < 0 || s >= nouts) throw DescriptorError("fastgrad program: store destination " + std::to_string(s) + " out of range");
}

Region Program::bind(char* const* ins, char* const* outs) const {
  Region r = region;
  for (size_t i = 0; i < r.loads.size(); ++i) r.loads[i].ptr = ins[load_src[i]];
  for (size_t k = 0; k < r.stores.size(); ++k) r.stores[k].ptr = outs[store_dst[k]];
  return r;
}

}  // namespace fg
