#include "stream_policy.h"

#include <atomic>

namespace fg {

namespace {
constexpr int64_t kDefaultStreamMinBytes = int64_t(8) << 20;
std::atomic<int64_t> g_min_bytes{kDefaultStreamMinBytes};
}  // namespace

int64_t stream_min_bytes() { return g_min_bytes.load(std::memory_order_relaxed); }

void set_stream_min_bytes(int64_t bytes) {
  g_min_bytes.store(bytes < 0 ? kDefaultStreamMinBytes : bytes, std::memory_order_relaxed);
}

}  // namespace fg
