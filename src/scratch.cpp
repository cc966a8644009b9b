// Native scratch accounting (src/scratch.h): bytes held by native calls in progress and their
// high-water mark since the last reset, process-wide (calls may run in several threads at once).
#include "scratch.h"

#include <algorithm>
#include <atomic>

namespace fastclip_py {
namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

void raise_peak(int64_t now) {
  int64_t seen = g_peak.load(std::memory_order_relaxed);
  while (now > seen && !g_peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
  }
}

}  // namespace

ScratchUse::ScratchUse(int64_t per_thread_bytes, int64_t threads, int64_t shared_bytes)
    : bytes_(std::max<int64_t>(0, per_thread_bytes) * std::max<int64_t>(1, threads) +
             std::max<int64_t>(0, shared_bytes)) {
  raise_peak(g_current.fetch_add(bytes_, std::memory_order_relaxed) + bytes_);
}

ScratchUse::~ScratchUse() { g_current.fetch_sub(bytes_, std::memory_order_relaxed); }

void bind_scratch(pybind11::module_& m) {
  m.def("scratch_bytes", [] { return g_current.load(); },
        "Bytes of native scratch (the core's per-thread buffers) held by calls in progress.");
  m.def("scratch_peak_bytes", [] { return g_peak.load(); },
        "Most bytes of native scratch held at once since the last scratch_reset_peak() (or the\n"
        "import): the core's per-thread buffers, which torch's memory profiler does not see,\n"
        "sized as the core sizes them for each call, times the threads the call may use.");
  m.def("scratch_reset_peak", [] { g_peak.store(g_current.load()); },
        "Restart scratch_peak_bytes() from the bytes held now.");
}

}  // namespace fastclip_py
