#include "small_gemm.h"

#include <algorithm>
#include <stdexcept>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTCLIP_SMALL_GEMM_AVX512 1
#include <immintrin.h>
#endif

namespace fastclip {

#ifdef FASTCLIP_SMALL_GEMM_AVX512
namespace {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// Rows a[0 .. MR) (the last ones may repeat: computed, not stored) times P's columns
// [0, cols) (cols <= 16 NV), into C's first `rows` rows.
template <int MR, int NV>
__attribute__((target("avx512f"))) void block(int64_t k, const float* const* a, const float* P,
                                              int64_t ldp, float* C, int64_t ldc, int rows,
                                              int64_t cols) {
  // Every loop below runs over compile-time bounds, so the accumulators stay in registers (a
  // loop to the runtime `rows` made GCC keep them in memory, a store each per step).
  __m512 acc[MR][NV];
  const __mmask16 last = tail_mask(cols - 16 * (NV - 1));  // only the last vector is partial
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* a_[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) a_[i] = a[i];
  for (int64_t q = 0; q < k; ++q) {
    const float* p = P + q * ldp;
    __m512 pv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV - 1; ++j) pv[j] = _mm512_loadu_ps(p + 16 * j);
    pv[NV - 1] = _mm512_maskz_loadu_ps(last, p + 16 * (NV - 1));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a_[i][q]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, pv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
#pragma GCC unroll 4
    for (int j = 0; j < NV - 1; ++j) _mm512_storeu_ps(C + i * ldc + 16 * j, acc[i][j]);
    _mm512_mask_storeu_ps(C + i * ldc + 16 * (NV - 1), last, acc[i][NV - 1]);
  }
}

template <int NV>
void columns(int64_t m, int64_t k, const float* A, int64_t lda, const float* P, int64_t ldp,
             float* C, int64_t ldc, int64_t cols) {
  constexpr int MR = 6;
  const float* a[MR];
  for (int64_t r0 = 0; r0 < m; r0 += MR) {
    const int rows = int(std::min<int64_t>(MR, m - r0));
    for (int i = 0; i < MR; ++i) a[i] = A + (r0 + std::min(i, rows - 1)) * lda;
    block<MR, NV>(k, a, P, ldp, C + r0 * ldc, ldc, rows, cols);
  }
}

}  // namespace
#endif

bool small_gemm_available() {
#ifdef FASTCLIP_SMALL_GEMM_AVX512
  return isa_level() >= kIsaAvx512;
#else
  return false;
#endif
}

void small_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* P,
                int64_t ldp, float* C, int64_t ldc) {
#ifdef FASTCLIP_SMALL_GEMM_AVX512
  if (m <= 0) return;
  for (int64_t n0 = 0; n0 < n; n0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - n0);
    switch ((cols + 15) / 16) {
      case 1: columns<1>(m, k, A, lda, P + n0, ldp, C + n0, ldc, cols); break;
      case 2: columns<2>(m, k, A, lda, P + n0, ldp, C + n0, ldc, cols); break;
      case 3: columns<3>(m, k, A, lda, P + n0, ldp, C + n0, ldc, cols); break;
      default: columns<4>(m, k, A, lda, P + n0, ldp, C + n0, ldc, cols); break;
    }
  }
#else
  (void)m, (void)n, (void)k, (void)A, (void)lda, (void)P, (void)ldp, (void)C, (void)ldc;
  throw std::logic_error("small_gemm is not built for this target");
#endif
}

}  // namespace fastclip
