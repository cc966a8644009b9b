// The float32 GEMMs fastclip forms with its own AVX-512 kernels: each keeps a 6 x 64 block of C in
// 24 vector registers, accumulates over the reduction in order (the same bits whatever the
// thread count or the caller's slicing) and runs on an x86-64 build where isa_level() is AVX-512.
//
// Why: the BLAS libraries at hand run these products at the AVX2 rate on the hosts measured
// (OpenBLAS pinned to Haswell kernels by OPENBLAS_CORETYPE; torch's MKL on AMD CPUs), half the
// AVX-512 rate of torch's own oneDNN kernels the non-private step uses for LSTMs and convolutions,
// on cores that issue 512-bit FMAs at full width. Where a core splits them in two (AMD Zen 4) the
// two rates are the same, and the products with a BLAS or torch alternative stay there
// (gemm_kernels_enabled()).
//
// * small_gemm: C = A P with P laid out once per call; the recurrent layers' step products (a
//   slice's few dozen rows, where BLAS would repack the weight on every call), their input
//   projections and input gradients.
// * clipped_gemm: the clipped sum of a linear map, sum_i c_i G_i^T A_i, straight from the
//   captured rows (no rescaled copy, no transposes).
// * tn_gemm: C = A^T B (the BLAS calls blas::gemm_tn / syrk_upper_t make for float32: the ghost
//   norms' Gram tiles of convolutions, the direct norm's tiles of linear maps); blas::gemm_nt /
//   syrk_upper transpose their factors first (the ghost norms of linear and recurrent layers).
#pragma once
#include <cstdint>

namespace fastclip {

// Whether small_gemm runs here: an x86-64 build where isa_level() is AVX-512 (common.h).
bool small_gemm_available();

// Whether the products that have a BLAS or torch alternative (clipped_gemm, tn_gemm) go to these
// kernels: they run here (small_gemm_available()) and are preferred. Preferred by default where
// the core issues 512-bit FMAs at full width (Intel, AMD Zen 5): twice the AVX2 rate the BLAS at
// hand runs. Not on AMD Zen 4, which splits them in two: there torch's MKL and OpenBLAS ran the
// same products 10-20% faster (bench/README.md). FASTCLIP_GEMM_KERNELS=0|1 sets the default;
// set_gemm_kernels switches it (returns the previous setting), for benchmarks and tests.
bool gemm_kernels_enabled();
bool set_gemm_kernels(bool enabled);

// C (m x n, leading dim ldc) = A (m x k, lda) times P (k x n, ldp), accumulated in float32 over
// q = 0 .. k - 1 in order (the same bits whatever the caller's slicing). Only call when available.
void small_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* P,
                int64_t ldp, float* C, int64_t ldc);

// The element type of clipped_gemm's A and G: float32, or 16-bit bfloat16 / float16 bits widened
// to float32 (exactly) as the kernel packs them.
enum class GemmInput { Float32, BFloat16, Float16 };

// C (p x d, leading dim ldc) = sum over rows q < N of (c[q / T] G[q, :])^T A[q, :], with A: N x d
// (lda) and G: N x p (ldg) the stacked rows of N / T examples of T positions each (both of
// `kind`) and c (N / T) their clip factors: the clipped sum G^T diag(c) A of a linear map. Each G
// row is widened to float32 and rescaled there (the value torch's widened(G) * c gives) and the
// products accumulate in float32 over q in order: a half-precision capture gives bit for bit
// what its float32 copy gives. Parallel over blocks of C's rows on up to num_threads threads.
// Only call when small_gemm_available().
void clipped_gemm(int64_t N, int64_t p, int64_t d, const void* A, int64_t lda, const void* G,
                  int64_t ldg, GemmInput kind, const float* c, int64_t T, float* C, int64_t ldc,
                  int num_threads);

// dst (cols x rows, leading dim ldd) = the transpose of src (rows x cols, leading dim lds): 16 x 16
// tiles in registers where AVX-512 runs, the edges (or everything) element by element.
void transpose_f32(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                   int64_t ldd);

// C (m x n, leading dim ldc) = A^T B, A: k x m (lda), B: k x n (ldb), float32, accumulated over
// k in order, on the calling thread. upper (m == n): only C's upper triangle is wanted, the
// strict lower one is left unspecified (as blas::syrk_upper_t). Only call when
// small_gemm_available().
void tn_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool upper);

}  // namespace fastclip
