// Shared helpers of the native core: strided views, argument checks, and the thread pool.
// No Python and no torch here: plain pointers, shapes and strides (in elements, not bytes).
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace fastclip {

// A read-only (n0, n1, n2) view whose last dimension is contiguous. The last stride is fixed at 1
// because BLAS takes one leading dimension per matrix: each example's (n1, n2) slab is a row-major
// matrix with leading dimension s1, which is all a GEMM/SYRK call can describe.
template <class T>
struct View3 {
  const T* data = nullptr;
  int64_t n0 = 0, n1 = 0, n2 = 0;
  int64_t s0 = 0, s1 = 0;  // element strides, >= 0

  const T* slab(int64_t i) const { return data + i * s0; }
  const T* row(int64_t i, int64_t t) const { return data + i * s0 + t * s1; }
  bool empty() const { return n0 == 0 || n1 == 0 || n2 == 0; }
};

// Argument errors raised by the core; the binding maps them to ValueError.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void check(bool ok, const std::string& message) {
  if (!ok) throw ArgumentError(message);
}

// Dot product accumulated in double. Lanes of T are summed over short runs and flushed to double,
// so float32 inputs keep float32 throughput (the 8 independent lanes let the compiler vectorise
// without -ffast-math) while the rounding error stays that of a run of <= kRun terms.
template <class T>
inline double dot(const T* x, const T* y, int64_t n) {
  constexpr int64_t kRun = 512;
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kRun) {
    const int64_t m = n - i0 < kRun ? n - i0 : kRun;
    const T* a = x + i0;
    const T* b = y + i0;
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= m; i += 8)
      for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
    double run = 0.0;
    for (; i < m; ++i) run += static_cast<double>(a[i]) * static_cast<double>(b[i]);
    for (int k = 0; k < 8; ++k) run += static_cast<double>(acc[k]);
    total += run;
  }
  return total;
}

template <class T>
inline double sum_sq(const T* x, int64_t n) { return dot(x, x, n); }

// Runs fn(begin, end) over disjoint chunks covering [0, n_items) on up to num_threads threads of a
// persistent pool; the calling thread takes chunks too, so num_threads == 1 never touches the pool.
// Safe under concurrency: if another thread is already using the pool, this call runs serially
// rather than waiting. Fork-safe: a forked child starts with a fresh, empty pool (the parent's
// workers do not exist there), so it never waits on them. The first exception thrown by fn is
// rethrown in the caller after all chunks finish.
void parallel_for(int64_t n_items, int num_threads,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace fastclip
