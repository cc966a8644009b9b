// C = A P for the recurrent layers' products with a weight laid out once per call (a slice's few
// dozen rows per time step, or all its steps' rows for the input projection and its gradient),
// float32, by an AVX-512 kernel.
//
// Why: BLAS repacks the whole weight on every call, which costs as much as the product when m is
// a few dozen rows, and where OpenBLAS is pinned to Haswell kernels (OPENBLAS_CORETYPE) it runs
// at the AVX2 rate. The kernel keeps a 6 x 64 block of C in 24 vector registers and streams P
// (k x 64 columns) once per 6 rows: P stays in L2 across the row blocks.
#pragma once
#include <cstdint>

namespace fastclip {

// Whether small_gemm runs here: an x86-64 build where isa_level() is AVX-512 (common.h).
bool small_gemm_available();

// C (m x n, leading dim ldc) = A (m x k, lda) times P (k x n, ldp), accumulated in float32 over
// q = 0 .. k - 1 in order (the same bits whatever the caller's slicing). Only call when available.
void small_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* P,
                int64_t ldp, float* C, int64_t ldc);

}  // namespace fastclip
