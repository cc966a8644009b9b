// Native scratch accounting: fastclip._C.scratch_bytes() / scratch_peak_bytes() /
// scratch_reset_peak(). The core's per-thread buffers (one example's unfold, Gram tiles, direct
// products) are std::vectors, invisible to torch's memory profiler; each binding that runs such a
// call holds a ScratchUse of the bytes the core allocates for it (sized as the core sizes them,
// times the threads the call may use: an upper bound), so a benchmark can add them to a step's
// peak (fastclip/benchmark.py).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace fastclip_py {

class ScratchUse {
 public:
  // per_thread_bytes on each of `threads` threads, plus `shared_bytes` once.
  ScratchUse(int64_t per_thread_bytes, int64_t threads, int64_t shared_bytes = 0);
  ~ScratchUse();
  ScratchUse(const ScratchUse&) = delete;
  ScratchUse& operator=(const ScratchUse&) = delete;

 private:
  int64_t bytes_;
};

void bind_scratch(pybind11::module_& m);

}  // namespace fastclip_py
