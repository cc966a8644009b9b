#include "gemm_avx512.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "avx512_tile.h"
#include "common.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#ifdef FASTCLIP_X86_AVX512
#define FASTCLIP_GEMM_AVX512 1
#endif

namespace fastclip {

namespace {

// Half-precision bits widened to float32, exactly (the scalar tails of widen()).
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise the mantissa
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {  // inf / NaN
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

#ifdef FASTCLIP_GEMM_AVX512
namespace {

// Rows of C per clipped_gemm block, and rows of A (positions) per pass over a column block: a
// 128 x 64 panel of A (32 KiB) stays in L1 while every row block of C reads it.
constexpr int kClippedRows = 6;
constexpr int64_t kClippedDepth = 128;

// Rows a[0 .. MR) (the last ones may repeat: computed, not stored) times P's columns
// [0, cols) (cols <= 16 NV), into C's first `rows` rows.
template <int MR, int NV>
__attribute__((target("avx512f"))) void block(int64_t k, const float* const* a, const float* P,
                                              int64_t ldp, float* C, int64_t ldc, int rows,
                                              int64_t cols) {
  __m512 acc[MR][NV];
  const __mmask16 last = tile::tail_mask(cols - 16 * (NV - 1));  // only the last vector is partial
  tile::zero(acc);
  const float* a_[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) a_[i] = a[i];
  for (int64_t q = 0; q < k; ++q) {
    __m512 pv[NV];
    tile::load(pv, P + q * ldp, last);
    float av[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) av[i] = a_[i][q];
    tile::fma(acc, av, pv);
  }
  tile::store(acc, C, ldc, rows, last);
}

template <int NV, int MR = 6>
void columns(int64_t m, int64_t k, const float* A, int64_t lda, const float* P, int64_t ldp,
             float* C, int64_t ldc, int64_t cols) {
  const float* a[MR];
  for (int64_t r0 = 0; r0 < m; r0 += MR) {
    const int rows = int(std::min<int64_t>(MR, m - r0));
    for (int i = 0; i < MR; ++i) a[i] = A + (r0 + std::min(i, rows - 1)) * lda;
    block<MR, NV>(k, a, P, ldp, C + r0 * ldc, ldc, rows, cols);
  }
}

// dst[0 .. n) = src[off .. off + n) widened to float32: 16 at a time in registers, the tail one
// by one.
__attribute__((target("avx512f"))) void widen(const void* src, int64_t off, int64_t n,
                                              GemmInput kind, float* dst) {
  const uint16_t* h = static_cast<const uint16_t*>(src) + off;
  int64_t j = 0;
  if (kind == GemmInput::BFloat16) {
    for (; j + 16 <= n; j += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + j));
      const __m512i w = _mm512_cvtepu16_epi32(raw);
      _mm512_storeu_ps(dst + j, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    for (; j < n; ++j) dst[j] = bf16_to_float(h[j]);
  } else {
    for (; j + 16 <= n; j += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + j));
      _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(raw));
    }
    for (; j < n; ++j) dst[j] = f16_to_float(h[j]);
  }
}

// dst (16 x 16, leading dim ldd) = the transpose of src (16 x 16, leading dim lds), in registers.
__attribute__((target("avx512f"))) void transpose16(const float* src, int64_t lds, float* dst,
                                                    int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved, per 128-bit lane
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks transposed within each lane
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int h = 0; h < 16; h += 8)  // then the lanes themselves, in two rounds
    for (int j = 0; j < 4; ++j) {
      t[h + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0x88);
      t[h + 4 + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

// Clipped sums: C's rows [i0, i0 + 6) x columns [0, cols) of a column block over kc rows of A,
// from the packed, rescaled G panel gp (kc x 6). `accumulate`: add to what C holds (later kc
// blocks), else overwrite.
template <int NV>
__attribute__((target("avx512f"))) void tn_block(int64_t kc, const float* gp, const float* A,
                                                 int64_t lda, float* C, int64_t ldc, int rows,
                                                 int64_t cols, bool accumulate) {
  constexpr int MR = kClippedRows;
  __m512 acc[MR][NV];
  const __mmask16 last = tile::tail_mask(cols - 16 * (NV - 1));
  tile::zero(acc);
  if (accumulate) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      if (i >= rows) break;
      tile::load(acc[i], C + i * ldc, last);
    }
  }
  for (int64_t q = 0; q < kc; ++q) {
    __m512 pv[NV];
    tile::load(pv, A + q * lda, last);
    float gv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) gv[i] = gp[q * MR + i];
    tile::fma(acc, gv, pv);
  }
  tile::store(acc, C, ldc, rows, last);
}

void tn_columns(int64_t kc, const float* gp, const float* A, int64_t lda, float* C, int64_t ldc,
                int rows, int64_t cols, bool accumulate) {
  switch ((cols + 15) / 16) {
    case 1: tn_block<1>(kc, gp, A, lda, C, ldc, rows, cols, accumulate); break;
    case 2: tn_block<2>(kc, gp, A, lda, C, ldc, rows, cols, accumulate); break;
    case 3: tn_block<3>(kc, gp, A, lda, C, ldc, rows, cols, accumulate); break;
    default: tn_block<4>(kc, gp, A, lda, C, ldc, rows, cols, accumulate); break;
  }
}

// Rows [b0 * 6, b1 * 6) of C (p x d) = sum over q < N of (c[q / T] G[q, :])^T A[q, :] (c null: no
// factors), G and A of `kind`. upper: C is square and only its upper triangle is wanted (column
// blocks left of a row block's diagonal are skipped; what they would hold stays unspecified).
void tn_rows(int64_t b0, int64_t b1, int64_t N, int64_t p, int64_t d, const void* A, int64_t lda,
             const void* G, int64_t ldg, GemmInput kind, const float* c, int64_t T, float* C,
             int64_t ldc, bool upper) {
  constexpr int MR = kClippedRows;
  const bool wide = kind == GemmInput::Float32;
  // G's rows of this range, widened, rescaled and packed per kc positions: block-major, then
  // position, then the block's 6 rows (zeros past p). Half-precision A: each kc x 64 panel
  // widened once, read by every row block. Per thread, kept between calls (the ghost norms call
  // this per example and tile).
  if (N <= 0) {  // an empty sum: zeros
    for (int64_t i = b0 * MR; i < std::min<int64_t>(b1 * MR, p); ++i)
      std::fill(C + i * ldc, C + i * ldc + d, 0.0f);
    return;
  }
  thread_local std::vector<float> gp, ap;
  gp.resize(size_t((b1 - b0) * kClippedDepth * MR));
  if (!wide) ap.resize(size_t(kClippedDepth * 64));
  for (int64_t q0 = 0; q0 < N; q0 += kClippedDepth) {
    const int64_t kc = std::min(kClippedDepth, N - q0);
    for (int64_t b = b0; b < b1; ++b) {
      float* dst = gp.data() + (b - b0) * kc * MR;
      const int64_t r0 = b * MR, rows = std::min<int64_t>(MR, p - r0);
      for (int64_t q = 0; q < kc; ++q) {
        const float cq = c ? c[(q0 + q) / T] : 1.0f;
        const int64_t at = (q0 + q) * ldg + r0;
        int64_t i = 0;
        if (wide) {
          const float* src = static_cast<const float*>(G) + at;
          if (c)
            for (; i < rows; ++i) dst[q * MR + i] = src[i] * cq;
          else
            for (; i < rows; ++i) dst[q * MR + i] = src[i];
        } else {
          float w[MR];
          widen(G, at, rows, kind, w);
          for (; i < rows; ++i) dst[q * MR + i] = w[i] * cq;
        }
        for (; i < MR; ++i) dst[q * MR + i] = 0.0f;
      }
    }
    const int64_t first = upper ? b0 * MR / 64 * 64 : 0;
    for (int64_t j0 = first; j0 < d; j0 += 64) {
      const int64_t cols = std::min<int64_t>(64, d - j0);
      const float* panel;
      int64_t ld;
      if (wide) {
        panel = static_cast<const float*>(A) + q0 * lda + j0;
        ld = lda;
      } else {
        for (int64_t q = 0; q < kc; ++q)
          widen(A, (q0 + q) * lda + j0, cols, kind, &ap[size_t(q * 64)]);
        panel = ap.data();
        ld = 64;
      }
      for (int64_t b = b0; b < b1; ++b) {
        if (upper && j0 + 64 <= b * MR) continue;  // wholly left of this row block's diagonal
        const int rows = int(std::min<int64_t>(MR, p - b * MR));
        tn_columns(kc, gp.data() + (b - b0) * kc * MR, panel, ld, C + b * MR * ldc + j0, ldc,
                   rows, cols, q0 > 0);
      }
    }
  }
}

}  // namespace
#endif

bool small_gemm_available() {
#ifdef FASTCLIP_GEMM_AVX512
  return isa_level() >= kIsaAvx512;
#else
  return false;
#endif
}

namespace {

// Whether this core issues a 512-bit FMA at twice its 256-bit rate. AMD's Zen 4 (family 0x19)
// splits every 512-bit operation into two 256-bit halves, so there the kernels lose their one
// edge over the BLAS at hand; Intel's AVX-512 cores and Zen 5 (family 0x1A) run them at full width.
bool full_width_fma512() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return true;
  const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
  if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return true;
  const unsigned base = (a >> 8) & 0xFu;
  const unsigned family = base == 0xFu ? base + ((a >> 20) & 0xFFu) : base;
  return family >= 0x1Au;
#else
  return true;
#endif
}

bool gemm_kernels_default() {
  if (const char* v = std::getenv("FASTCLIP_GEMM_KERNELS")) {
    const std::string s = v;
    if (s == "0" || s == "off") return false;
    if (s == "1" || s == "on") return true;
  }
  return full_width_fma512();
}

std::atomic<bool>& gemm_kernels_flag() {
  static std::atomic<bool> flag{gemm_kernels_default()};
  return flag;
}

}  // namespace

bool gemm_kernels_enabled() {
  return small_gemm_available() && gemm_kernels_flag().load(std::memory_order_relaxed);
}

bool set_gemm_kernels(bool enabled) { return gemm_kernels_flag().exchange(enabled); }

void small_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* P,
                int64_t ldp, float* C, int64_t ldc) {
#ifdef FASTCLIP_GEMM_AVX512
  if (m <= 0) return;
  // Row counts divisible by 8 but not 6 (a slice of 32 examples, a step's 2048 input rows) run
  // 8 x 48 blocks: no rows computed in vain (the recurrent bench layer's native forward and
  // backward 1-2 ms faster). Each element's sum is the same whatever the block shape.
  if (m % 6 != 0 && m % 8 == 0) {
    for (int64_t n0 = 0; n0 < n; n0 += 48) {
      const int64_t cols = std::min<int64_t>(48, n - n0);
      switch ((cols + 15) / 16) {
        case 1: columns<1, 8>(m, k, A, lda, P + n0, ldp, C + n0, ldc, cols); break;
        case 2: columns<2, 8>(m, k, A, lda, P + n0, ldp, C + n0, ldc, cols); break;
        default: columns<3, 8>(m, k, A, lda, P + n0, ldp, C + n0, ldc, cols); break;
      }
    }
    return;
  }
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

void clipped_gemm(int64_t N, int64_t p, int64_t d, const void* A, int64_t lda, const void* G,
                  int64_t ldg, GemmInput kind, const float* c, int64_t T, float* C, int64_t ldc,
                  int num_threads) {
#ifdef FASTCLIP_GEMM_AVX512
  if (p <= 0 || d <= 0) return;
  const int64_t blocks = (p + kClippedRows - 1) / kClippedRows;
  // Below ~4 Mflop the pool's wake-up costs more than a second thread saves.
  const int threads = 2.0 * double(N) * double(p) * double(d) < 4e6 ? 1 : num_threads;
  parallel_for(blocks, threads, [&](int64_t b0, int64_t b1) {
    tn_rows(b0, b1, N, p, d, A, lda, G, ldg, kind, c, T, C, ldc, false);
  });
#else
  (void)N, (void)p, (void)d, (void)A, (void)lda, (void)G, (void)ldg, (void)kind, (void)c, (void)T,
      (void)C, (void)ldc, (void)num_threads;
  throw std::logic_error("clipped_gemm is not built for this target");
#endif
}

void transpose_f32(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                   int64_t ldd) {
  const int64_t r16 = small_gemm_available() ? rows / 16 * 16 : 0;
  const int64_t c16 = small_gemm_available() ? cols / 16 * 16 : 0;
#ifdef FASTCLIP_GEMM_AVX512
  for (int64_t c0 = 0; c0 < c16; c0 += 16)
    for (int64_t r0 = 0; r0 < r16; r0 += 16)
      transpose16(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
#endif
  // The edges (and everything without AVX-512) element by element, along src's rows.
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    for (int64_t c = r < r16 ? c16 : 0; c < cols; ++c) dst[c * ldd + r] = s[c];
  }
}

void tn_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool upper) {
#ifdef FASTCLIP_GEMM_AVX512
  if (m <= 0 || n <= 0) return;
  tn_rows(0, (m + kClippedRows - 1) / kClippedRows, k, m, n, B, ldb, A, lda, GemmInput::Float32,
          nullptr, 1, C, ldc, upper);
#else
  (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc;
  (void)upper;
  throw std::logic_error("tn_gemm is not built for this target");
#endif
}

}  // namespace fastclip
