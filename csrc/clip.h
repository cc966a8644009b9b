// Clip-and-accumulate kernels of NanoBatch mode: per-example gradient norms of a nanobatch and
// the clipped sum added into the accumulators, parallel over the parameter vector.
#pragma once

#include <cstdint>

namespace fastclip {

// One parameter's gradients for the k examples of a nanobatch.
struct ClipPart {
  const void* grad = nullptr;  // (k, n) row-major, float or double as f64 says
  void* acc = nullptr;         // (n,) of the same type, or nullptr (norms only)
  int64_t n = 0;               // elements of the parameter
  int64_t group = 0;           // clipping group (layer) in [0, L)
  bool f64 = false;
};

// sq[i * L + l] = sum over the parts of group l of ||grad[i, :]||^2, in double, for i < k.
// The parameter vector is cut into fixed chunks whose partial sums are added in a fixed order,
// so the result does not depend on the number of threads.
void clip_sq_norms(const ClipPart* parts, int64_t n_parts, int64_t k, int64_t L, double* sq,
                   int num_threads);

// acc[:] += sum_i factors[i * L + group] * grad[i, :] for every part; a row whose factor is 0 is
// skipped entirely (an example with a non-finite gradient must add nothing, and 0 * NaN is NaN).
void clip_accumulate(const ClipPart* parts, int64_t n_parts, int64_t k, int64_t L,
                     const double* factors, int num_threads);

}  // namespace fastclip
