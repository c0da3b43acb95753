// Which outputs may be written with streaming (non-temporal) stores: those of at least
// stream_min_bytes(), too large to stay in the caches for whatever reads them next. Whether a
// compiled loop then does is timed per program (Program::run): on some machines a loop that
// calls vector transcendentals ran 1.5x slower with them (docs/performance-history-nov27.md).
#pragma once
#include <cstdint>

namespace fg {

// Outputs of at least this many bytes may be streamed (the interpreter's regions and row
// groups, the compiled loops: region_extents.h, large_output). 8 MiB unless set.
int64_t stream_min_bytes();

// Sets it (tests force streaming on small tensors); a value < 0 restores the default.
void set_stream_min_bytes(int64_t bytes);

}  // namespace fg
