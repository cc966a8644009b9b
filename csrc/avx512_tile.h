// The register tile the AVX-512 kernels share (gemm_avx512.cpp, conv_direct.cpp): MR rows x NV
// vectors of 16 float32 accumulators, set to zero, and stored to MR (or fewer) rows of C with
// only the last vector masked. Include only where FASTCLIP_X86_AVX512 is defined; every function
// is inlined into its avx512f caller and loops to compile-time bounds, so the tile stays in
// registers (a loop to a runtime row count made GCC keep it in memory, a store per step).
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTCLIP_X86_AVX512 1
#include <immintrin.h>

#include <cstdint>

namespace fastclip {
namespace tile {

#define FASTCLIP_TILE_INLINE __attribute__((target("avx512f"), always_inline)) inline

// The lanes of a vector holding `left` (1 .. 16 or more) of a row's remaining columns.
FASTCLIP_TILE_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

template <int MR, int NV>
FASTCLIP_TILE_INLINE void zero(__m512 (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
}

// v = NV vectors of one row from p, the last one masked (lanes past it read as zero, untouched).
template <int NV>
FASTCLIP_TILE_INLINE void load(__m512 (&v)[NV], const float* p, __mmask16 last) {
#pragma GCC unroll 4
  for (int j = 0; j < NV - 1; ++j) v[j] = _mm512_loadu_ps(p + 16 * j);
  v[NV - 1] = _mm512_maskz_loadu_ps(last, p + 16 * (NV - 1));
}

// acc[i][j] += a[i] * pv[j]: one rank-1 update of the tile.
template <int MR, int NV>
FASTCLIP_TILE_INLINE void fma(__m512 (&acc)[MR][NV], const float (&a)[MR], const __m512 (&pv)[NV]) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512 av = _mm512_set1_ps(a[i]);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, pv[j], acc[i][j]);
  }
}

// C's first `rows` rows (leading dim ldc) = the tile; `last` masks its last vector.
template <int MR, int NV>
FASTCLIP_TILE_INLINE void store(const __m512 (&acc)[MR][NV], float* C, int64_t ldc, int rows,
                                __mmask16 last) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
#pragma GCC unroll 4
    for (int j = 0; j < NV - 1; ++j) _mm512_storeu_ps(C + i * ldc + 16 * j, acc[i][j]);
    _mm512_mask_storeu_ps(C + i * ldc + 16 * (NV - 1), last, acc[i][NV - 1]);
  }
}

#undef FASTCLIP_TILE_INLINE

}  // namespace tile
}  // namespace fastclip
#endif
