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

// Dot product accumulated in double. Lanes of the input type are summed over short runs and
// flushed to double, so float32 keeps float32 throughput while the rounding error stays that of a
// run of a few hundred terms. Compiled for several ISAs and picked at load time (the build itself
// stays portable: no -march=native).
double dot(const float* x, const float* y, int64_t n);
double dot(const double* x, const double* y, int64_t n);

template <class T>
inline double sum_sq(const T* x, int64_t n) { return dot(x, x, n); }

// The widest vector instruction set the hand-vectorised kernels (noise.cpp's Philox) may use in
// this process, detected once from the CPU. FASTCLIP_ISA=portable|avx2 caps it (any other value:
// no cap), so tests can compare every level's results on one machine. (Loops the compiler
// vectorises are cloned per ISA with target_clones and picked by the loader instead.)
enum IsaLevel { kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
int isa_level();
const char* isa_name();  // "portable", "avx2" or "avx512"

// Runs fn(begin, end) over disjoint chunks covering [0, n_items) on up to num_threads threads; the
// calling thread takes chunks too, so num_threads == 1 never touches another thread. The threads are
// torch's OpenMP team when the process has loaded libgomp (torch does), else a persistent pool of
// the core's own (see parallel_backend()).
// Safe under concurrency: if another thread is already using the pool, this call runs serially
// rather than waiting. Fork-safe: a forked child starts with a fresh, empty pool (the parent's
// workers do not exist there), so it never waits on them. The first exception thrown by fn is
// rethrown in the caller after all chunks finish.
void parallel_for(int64_t n_items, int num_threads,
                  const std::function<void(int64_t, int64_t)>& fn);

// Which threads parallel_for runs on in this process: "openmp" (the OpenMP team of the libgomp
// already loaded, i.e. torch's) or "own" (the core's pool: no libgomp loaded, a forked child, or
// FASTCLIP_OWN_POOL set in the environment).
std::string parallel_backend();

}  // namespace fastclip
