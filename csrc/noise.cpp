#include "noise.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#include <immintrin.h>
#endif

#include "common.h"

namespace fastclip {
namespace {

// Normals are produced in blocks of kBlock: block b uses Philox counters 4 * kBlock... so a chunk
// boundary at a multiple of kBlock changes nothing in the stream (nor does kBlock itself: normal
// p always comes from counter p / 4). 128, not 64: with 64 the lane loops are too short for GCC
// to vectorise them well (2.9 ns per normal and thread vs 1.55 ns; same values, bit for bit).
constexpr int64_t kBlock = 128;

// The helpers below are forced inline into the ISA-specific clones of noise_range_f/_d: a call
// into a separately compiled (baseline-ISA) copy would lose the vectorisation.
#if defined(__GNUC__)
#define NOISE_INLINE inline __attribute__((always_inline))
#else
#define NOISE_INLINE inline
#endif

// One Philox4x32-10 evaluation for kBlock / 4 consecutive counters, written as plain loops over
// lanes (the portable variant; the compiler vectorises it where it can).
void philox_portable(uint64_t counter0, uint32_t k0, uint32_t k1, uint32_t out[kBlock]) {
  constexpr int L = kBlock / 4;
  // 32-bit words held in 64-bit lanes: a 32 x 32 -> 64-bit product per lane is then a plain
  // 64-bit multiply of values below 2^32, which vectorises (vpmuludq) where a high-half multiply
  // of 32-bit lanes does not.
  uint64_t c0[L], c1[L], c2[L], c3[L];
  for (int l = 0; l < L; ++l) {
    const uint64_t c = counter0 + static_cast<uint64_t>(l);
    c0[l] = c & 0xffffffffu;
    c1[l] = c >> 32;
    c2[l] = 0x6A09E667u;  // fixed third and fourth counter words: the stream is (seed, position)
    c3[l] = 0xBB67AE85u;
  }
  uint64_t a = k0, b = k1;
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < L; ++l) {
      const uint64_t t0 = c0[l] * 0xD2511F53u;
      const uint64_t t1 = c2[l] * 0xCD9E8D57u;
      c0[l] = ((t1 >> 32) ^ c1[l] ^ a) & 0xffffffffu;
      c2[l] = ((t0 >> 32) ^ c3[l] ^ b) & 0xffffffffu;
      c1[l] = t1 & 0xffffffffu;
      c3[l] = t0 & 0xffffffffu;
    }
    a = (a + 0x9E3779B9u) & 0xffffffffu;
    b = (b + 0xBB67AE85u) & 0xffffffffu;
  }
  for (int l = 0; l < L; ++l) {
    out[4 * l] = static_cast<uint32_t>(c0[l]);
    out[4 * l + 1] = static_cast<uint32_t>(c1[l]);
    out[4 * l + 2] = static_cast<uint32_t>(c2[l]);
    out[4 * l + 3] = static_cast<uint32_t>(c3[l]);
  }
}

// The same words with explicit vectors. The portable loops keep every lane array in memory
// between rounds (a store per word and round); here each group of counters stays in registers
// for all ten rounds. The 32-bit words sit in 64-bit lanes whose high halves are left as garbage:
// vpmuludq reads only the low halves, and only the low halves are stored.
// Measured (one thread, 670k words): portable 0.84 ns per word, AVX-512 0.42, AVX2 0.98 (the
// portable loops in the AVX2 clone: 2.5).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define NOISE_X86_VARIANTS 1
// GCC 12's avx512fintrin.h builds set1/shift results from a deliberately undefined vector
// (_mm512_undefined_epi32) and then warns about it; the warning is about the header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
__attribute__((target("avx512f"))) void philox_avx512(uint64_t counter0, uint32_t k0, uint32_t k1,
                                                      uint32_t out[kBlock]) {
  constexpr int G = kBlock / 32;  // groups of 8 counters, all in flight: 16 of 32 registers
  __m512i c0[G], c1[G], c2[G], c3[G];
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int g = 0; g < G; ++g) {
    const __m512i c =
        _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(counter0 + 8 * g)), lane);
    c0[g] = c;
    c1[g] = _mm512_srli_epi64(c, 32);
    c2[g] = _mm512_set1_epi64(0x6A09E667);
    c3[g] = _mm512_set1_epi64(0xBB67AE85);
  }
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
  uint32_t a = k0, b = k1;
  for (int round = 0; round < 10; ++round) {
    const __m512i ka = _mm512_set1_epi64(a), kb = _mm512_set1_epi64(b);
    for (int g = 0; g < G; ++g) {
      const __m512i t0 = _mm512_mul_epu32(c0[g], m0), t1 = _mm512_mul_epu32(c2[g], m1);
      c0[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(t1, 32), c1[g], ka, 0x96);  // 3-way xor
      c2[g] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(t0, 32), c3[g], kb, 0x96);
      c1[g] = t1;
      c3[g] = t0;
    }
    a += 0x9E3779B9u;
    b += 0xBB67AE85u;
  }
  // Words (c0, c1) and (c2, c3) paired in 64-bit lanes, then the pairs of 8 counters interleaved
  // into counter order.
  const __m512i lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  for (int g = 0; g < G; ++g) {
    const __m512i p01 = _mm512_mask_blend_epi32(0xAAAA, c0[g], _mm512_slli_epi64(c1[g], 32));
    const __m512i p23 = _mm512_mask_blend_epi32(0xAAAA, c2[g], _mm512_slli_epi64(c3[g], 32));
    _mm512_storeu_si512(out + 32 * g, _mm512_permutex2var_epi64(p01, lo, p23));
    _mm512_storeu_si512(out + 32 * g + 16, _mm512_permutex2var_epi64(p01, hi, p23));
  }
}

__attribute__((target("avx2"))) void philox_avx2(uint64_t counter0, uint32_t k0, uint32_t k1,
                                                 uint32_t out[kBlock]) {
  constexpr int G = 2;  // groups of 4 counters in flight: 8 state registers of 16
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
  for (int g0 = 0; g0 < kBlock / 4; g0 += 4 * G) {
    __m256i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      const __m256i c = _mm256_add_epi64(
          _mm256_set1_epi64x(static_cast<long long>(counter0 + g0 + 4 * g)), lane);
      c0[g] = c;
      c1[g] = _mm256_srli_epi64(c, 32);
      c2[g] = _mm256_set1_epi64x(0x6A09E667);
      c3[g] = _mm256_set1_epi64x(0xBB67AE85);
    }
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i ka = _mm256_set1_epi64x(a), kb = _mm256_set1_epi64x(b);
      for (int g = 0; g < G; ++g) {
        const __m256i t0 = _mm256_mul_epu32(c0[g], m0), t1 = _mm256_mul_epu32(c2[g], m1);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(t1, 32), c1[g]), ka);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(t0, 32), c3[g]), kb);
        c1[g] = t1;
        c3[g] = t0;
      }
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    for (int g = 0; g < G; ++g) {
      const __m256i p01 = _mm256_blend_epi32(c0[g], _mm256_slli_epi64(c1[g], 32), 0xAA);
      const __m256i p23 = _mm256_blend_epi32(c2[g], _mm256_slli_epi64(c3[g], 32), 0xAA);
      const __m256i l = _mm256_unpacklo_epi64(p01, p23), h = _mm256_unpackhi_epi64(p01, p23);
      uint32_t* o = out + 4 * (g0 + 4 * g);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(l, h, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_permute2x128_si256(l, h, 0x31));
    }
  }
}
#pragma GCC diagnostic pop
#endif

// The variant for this process's isa_level() (FASTCLIP_ISA caps it: tests compare every variant
// bit for bit).
using PhiloxFn = void (*)(uint64_t, uint32_t, uint32_t, uint32_t*);
PhiloxFn choose_philox() {
#ifdef NOISE_X86_VARIANTS
  if (isa_level() >= kIsaAvx512) return philox_avx512;
  if (isa_level() >= kIsaAvx2) return philox_avx2;
#endif
  return philox_portable;
}

// Branch-free float log for u in (0, 1]: u = m 2^e with m in [sqrt(1/2), sqrt(2)), then
// log(m) by the Cephes logf polynomial (error ~1 ulp). Branch-free so the loop vectorises.
NOISE_INLINE float log_unit(float u) {
  int32_t bits;
  std::memcpy(&bits, &u, 4);
  int32_t e = ((bits >> 23) & 0xff) - 126;           // u = m' 2^e, m' in [0.5, 1)
  int32_t mb = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mb, 4);
  // Move m' to [sqrt(1/2), sqrt(2)): where m' is small, use 2 m' and e - 1 (arithmetic, not a
  // branch, so the loop stays vectorisable).
  const int32_t small = m < 0.70710678f;
  e -= small;
  const float x = m * static_cast<float>(1 + small) - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return x + y + 0.693359375f * fe;
}

// sin and cos of 2 pi v for v in [0, 1): v = q/4 + f with f in [-1/8, 1/8], the polynomials on
// a = 2 pi f in [-pi/4, pi/4] (Cephes sinf/cosf, error ~1 ulp), then a quarter-turn rotation.
NOISE_INLINE void sincos_turn(float v, float* s, float* c) {
  const int32_t qi = static_cast<int32_t>(v * 4.0f + 0.5f);  // round half up; v >= 0
  const float q = static_cast<float>(qi);
  const float a = (v - 0.25f * q) * 6.28318530717958647692f;
  const float z = a * a;
  const float sa = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  const float ca = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) *
                       z * z - 0.5f * z + 1.0f;
  // Quarter turns k: (sin, cos) = (sa, ca), (ca, -sa), (-sa, -ca), (-ca, sa); as sign and swap
  // arithmetic so the compiler can blend instead of branching.
  const int32_t k = qi & 3;
  const float swap = static_cast<float>(k & 1);
  const float s_sign = 1.0f - static_cast<float>(k & 2);
  const float c_sign = 1.0f - static_cast<float>((k + 1) & 2);
  const float s1 = s_sign * (swap * ca + (1.0f - swap) * sa);
  const float c1 = c_sign * (swap * sa + (1.0f - swap) * ca);
  *s = s1;
  *c = c1;
}

// kBlock standard normals from block number `block` of the stream: Box-Muller on pairs of 32-bit
// uniforms. u1 = (x + 0.5) 2^-32 lies in (0, 1), so the radius is finite and reaches 6.7 sigma.
NOISE_INLINE void normal_block(PhiloxFn philox, uint64_t block, uint32_t k0, uint32_t k1,
                               float z[kBlock]) {
  uint32_t r[kBlock];
  philox(block * (kBlock / 4), k0, k1, r);
  constexpr int H = kBlock / 2;
  float rad[H], s[H], c[H];
  for (int j = 0; j < H; ++j) {
    const float u1 = (static_cast<float>(r[2 * j] >> 8) + 0.5f) * (1.0f / 16777216.0f);
    rad[j] = std::sqrt(-2.0f * log_unit(u1));
    const float u2 = static_cast<float>(r[2 * j + 1] >> 8) * (1.0f / 16777216.0f);
    sincos_turn(u2, &s[j], &c[j]);
  }
  for (int j = 0; j < H; ++j) {
    z[2 * j] = rad[j] * c[j];
    z[2 * j + 1] = rad[j] * s[j];
  }
}

template <class T>
NOISE_INLINE void noise_range(T* x, int64_t begin, int64_t end, T std, T scale, uint32_t k0, uint32_t k1) {
  float z[kBlock];
  static const PhiloxFn philox = choose_philox();
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    normal_block(philox, static_cast<uint64_t>(b0 / kBlock), k0, k1, z);
    const int64_t m = std::min<int64_t>(kBlock, end - b0);
    T* xb = x + b0;
    for (int64_t j = 0; j < m; ++j) xb[j] = (xb[j] + std * static_cast<T>(z[j])) * scale;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define NOISE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NOISE_MULTIVERSION
#endif

NOISE_MULTIVERSION void noise_range_f(float* x, int64_t b, int64_t e, float std, float scale,
                                      uint32_t k0, uint32_t k1) {
  noise_range(x, b, e, std, scale, k0, k1);
}
NOISE_MULTIVERSION void noise_range_d(double* x, int64_t b, int64_t e, double std, double scale,
                                      uint32_t k0, uint32_t k1) {
  noise_range(x, b, e, std, scale, k0, k1);
}

// Chunks are whole blocks, so every block of normals is generated by exactly one thread.
template <class T, class F>
void run(T* x, int64_t n, uint64_t seed, int num_threads, F range) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  // ~4 ns per normal for one thread: below ~64k normals the pool's wake-up is not worth it.
  const int threads = n < 65536 ? 1 : num_threads;
  parallel_for(blocks, threads, [&](int64_t b0, int64_t b1) {
    range(x, b0 * kBlock, std::min(n, b1 * kBlock), k0, k1);
  });
}

// Non-finite test by the exponent bits (immune to -ffast-math), an OR reduction that vectorises.
// Bits: the unsigned integer of T's width; kExp: T's exponent mask (all ones = inf or NaN).
template <typename T, typename Bits, Bits kExp>
NOISE_INLINE uint32_t nonfinite_bits(const T* x, int64_t n) {
  static_assert(sizeof(T) == sizeof(Bits), "bit pattern of the element's width");
  uint32_t any = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, x + i, sizeof(T));
    any |= static_cast<uint32_t>((b & kExp) == kExp);
  }
  return any;
}
NOISE_MULTIVERSION uint32_t nonfinite_f(const float* x, int64_t n) {
  return nonfinite_bits<float, uint32_t, 0x7f800000u>(x, n);
}
NOISE_MULTIVERSION uint32_t nonfinite_d(const double* x, int64_t n) {
  return nonfinite_bits<double, uint64_t, 0x7ff0000000000000ull>(x, n);
}
uint32_t nonfinite(const float* x, int64_t n) { return nonfinite_f(x, n); }
uint32_t nonfinite(const double* x, int64_t n) { return nonfinite_d(x, n); }

// The tensors' blocks of kBlock elements numbered one after another (tensor 0's first), so one
// parallel_for covers them all; a chunk [g0, g1) of global blocks maps to a range of whole blocks
// within each tensor it touches, so every block of a tensor's stream is still generated by one
// thread at its own position.
template <class P, class F>
void over_blocks(P const* xs, const int64_t* ns, int64_t count, int num_threads, F fn) {
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);
  int64_t total = 0;
  for (int64_t t = 0; t < count; ++t) {
    first[t] = total;
    total += (ns[t] + kBlock - 1) / kBlock;
    (void)xs;
  }
  first[count] = total;
  int64_t elements = 0;
  for (int64_t t = 0; t < count; ++t) elements += ns[t];
  const int threads = elements < 65536 ? 1 : num_threads;
  parallel_for(total, threads, [&](int64_t g0, int64_t g1) {
    // The first tensor whose blocks reach past g0.
    int64_t t = std::upper_bound(first.begin(), first.begin() + count + 1, g0) - first.begin() - 1;
    for (; t < count && first[t] < g1; ++t) {
      const int64_t b0 = std::max(g0, first[t]) - first[t];
      const int64_t b1 = std::min(g1, first[t + 1]) - first[t];
      if (b1 <= b0) continue;
      fn(t, b0 * kBlock, std::min(ns[t], b1 * kBlock));
    }
  });
}

template <class T>
bool all_finite_impl(const T* const* xs, const int64_t* ns, int64_t count, int num_threads) {
  std::atomic<uint32_t> bad{0};
  over_blocks(xs, ns, count, num_threads, [&](int64_t t, int64_t b, int64_t e) {
    if (nonfinite(xs[t] + b, e - b)) bad.store(1, std::memory_order_relaxed);
  });
  return bad.load() == 0;
}

}  // namespace

bool all_finite(const float* const* xs, const int64_t* ns, int64_t count, int num_threads) {
  return all_finite_impl(xs, ns, count, num_threads);
}
bool all_finite(const double* const* xs, const int64_t* ns, int64_t count, int num_threads) {
  return all_finite_impl(xs, ns, count, num_threads);
}

bool add_gaussian_noise_checked(float* const* xs, const int64_t* ns, int64_t count, double std,
                                double scale, const uint64_t* seeds, int num_threads) {
  if (!all_finite_impl(xs, ns, count, num_threads)) return false;
  if (std == 0.0) {
    if (scale != 1.0)
      over_blocks(xs, ns, count, num_threads, [&](int64_t t, int64_t b, int64_t e) {
        float* x = xs[t];
        for (int64_t i = b; i < e; ++i) x[i] = static_cast<float>(x[i] * scale);
      });
    return true;
  }
  const float s = static_cast<float>(std), sc = static_cast<float>(scale);
  over_blocks(xs, ns, count, num_threads, [&](int64_t t, int64_t b, int64_t e) {
    noise_range_f(xs[t], b, e, s, sc, static_cast<uint32_t>(seeds[t]),
                  static_cast<uint32_t>(seeds[t] >> 32));
  });
  return true;
}

bool add_gaussian_noise_checked(double* const* xs, const int64_t* ns, int64_t count, double std,
                                double scale, const uint64_t* seeds, int num_threads) {
  if (!all_finite_impl(xs, ns, count, num_threads)) return false;
  if (std == 0.0) {
    if (scale != 1.0)
      over_blocks(xs, ns, count, num_threads, [&](int64_t t, int64_t b, int64_t e) {
        double* x = xs[t];
        for (int64_t i = b; i < e; ++i) x[i] *= scale;
      });
    return true;
  }
  over_blocks(xs, ns, count, num_threads, [&](int64_t t, int64_t b, int64_t e) {
    noise_range_d(xs[t], b, e, std, scale, static_cast<uint32_t>(seeds[t]),
                  static_cast<uint32_t>(seeds[t] >> 32));
  });
  return true;
}

void add_gaussian_noise(float* x, int64_t n, double std, double scale, uint64_t seed,
                        int num_threads) {
  if (std == 0.0) {
    if (scale != 1.0) for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(x[i] * scale);
    return;
  }
  run(x, n, seed, num_threads, [&](float* p, int64_t b, int64_t e, uint32_t k0, uint32_t k1) {
    noise_range_f(p, b, e, static_cast<float>(std), static_cast<float>(scale), k0, k1);
  });
}

void add_gaussian_noise(double* x, int64_t n, double std, double scale, uint64_t seed,
                        int num_threads) {
  if (std == 0.0) {
    if (scale != 1.0) for (int64_t i = 0; i < n; ++i) x[i] *= scale;
    return;
  }
  run(x, n, seed, num_threads, [&](double* p, int64_t b, int64_t e, uint32_t k0, uint32_t k1) {
    noise_range_d(p, b, e, std, scale, k0, k1);
  });
}

void gaussian(float* out, int64_t n, uint64_t seed, int num_threads) {
  std::fill(out, out + n, 0.0f);
  add_gaussian_noise(out, n, 1.0, 1.0, seed, num_threads);
}

}  // namespace fastclip
