// Dense matrix products used by the kernels: OpenBLAS when it has been loaded (at runtime, from a
// path given by the caller), otherwise plain C++ loops. Results never depend on which one ran
// beyond floating-point rounding, so the library is an accelerator, not a dependency.
//
// All matrices are row-major with a leading dimension (row stride, in elements) and unit stride
// along rows. Each call runs on the calling thread only: OpenBLAS is pinned to one thread because
// the kernels already parallelise over examples.
#pragma once

#include <cstdint>
#include <string>

namespace fastclip {
namespace blas {

// Loads the OpenBLAS shared library at `path` (symbols prefixed "scipy_", as in the
// scipy-openblas32 wheel). Returns false, keeping the previous state, if it cannot be loaded.
bool load(const std::string& path, std::string* error = nullptr);
bool loaded();
// Lets tests and benchmarks force the loop fallback while a library is loaded; returns the old flag.
bool set_enabled(bool enabled);
std::string info();
// Whether the loaded library's GEMM has a small-matrix path that beats its SYRK on small Gram
// tiles despite twice the flops: OpenBLAS' AVX-512 cores (SkylakeX and its successors) have one;
// on the others (Haswell/Zen kernels on AVX2 machines, measured: SYRK 0.6-0.9x of GEMM's time
// from n = 16 to 256) SYRK is faster at every size. False without a library.
bool small_gemm_beats_syrk();

// C (n x n, upper triangle incl. diagonal) = A A^T, A: n x k. The strict lower triangle of C is
// left unspecified.
template <class T>
void syrk_upper(int64_t n, int64_t k, const T* A, int64_t lda, T* C, int64_t ldc);

// C (n x n, upper triangle incl. diagonal) = A^T A, A: k x n (the Gram matrix of A's columns).
// The strict lower triangle of C is left unspecified.
template <class T>
void syrk_upper_t(int64_t n, int64_t k, const T* A, int64_t lda, T* C, int64_t ldc);

// C (m x n) = A B^T, A: m x k, B: n x k.
template <class T>
void gemm_nt(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T* C, int64_t ldc);

// C (m x n) = A^T B, A: k x m, B: k x n.
template <class T>
void gemm_tn(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T* C, int64_t ldc);

}  // namespace blas
}  // namespace fastclip
