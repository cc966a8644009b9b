#include "conv_direct.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

#include "avx512_tile.h"
#include "gemm_avx512.h"
#ifdef FASTCLIP_X86_AVX512
#define FASTCLIP_CONV_AVX512 1
#endif

namespace fastclip {

namespace {

// Output lines shorter than this pay their per-line setup (a pointer per row) on too few
// positions: the unfold and BLAS path is taken instead.
constexpr int64_t kMinLine = 4;

struct Padded {
  int64_t Dp, Hp, Wp;
  int64_t channel() const { return Dp * Hp * Wp; }
};

Padded padded_dims(const ConvShape& s) {
  return {s.in[0] + s.pad_lo[0] + s.pad_hi[0], s.in[1] + s.pad_lo[1] + s.pad_hi[1],
          s.in[2] + s.pad_lo[2] + s.pad_hi[2]};
}

int64_t padded_cols(int64_t Og) { return (Og + 15) / 16 * 16; }

#ifdef FASTCLIP_CONV_AVX512

// acc[MR][NV] (rows k0 .. k0 + MR of K, columns n0 .. n0 + 16 NV of Og) over every output
// position, stored to C for the first `rows` rows and `cols` columns. off[i]: row i's offset in
// the padded input; gt: the transposed G (P x ldgt) at column n0.
template <int MR, int NV>
__attribute__((target("avx512f"))) void block(const ConvShape& s, const Padded& pd,
                                              const float* xpad, const int64_t* off,
                                              const float* gt, int64_t ldgt, float* C,
                                              int64_t ldc, int rows, int cols) {
  __m512 acc[MR][NV];
  tile::zero(acc);
  const int64_t Wo = s.out[2], sw = s.stride[2];
  const int64_t HWp = pd.Hp * pd.Wp;
  const float* gp = gt;
  for (int64_t od = 0; od < s.out[0]; ++od) {
    for (int64_t oh = 0; oh < s.out[1]; ++oh) {
      const float* line = xpad + od * s.stride[0] * HWp + oh * s.stride[1] * pd.Wp;
      const float* r[MR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) r[i] = line + off[i];
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const int64_t q = ow * sw;
        __m512 gv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) gv[j] = _mm512_loadu_ps(gp + 16 * j);
        float av[MR];
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) av[i] = r[i][q];
        tile::fma(acc, av, gv);
        gp += ldgt;
      }
    }
  }
  // Only the last vector may be partial.
  tile::store(acc, C, ldc, rows, tile::tail_mask(cols - 16 * (NV - 1)));
}

// Every row block of K for the column block n0 .. n0 + 16 NV.
template <int MR, int NV>
void column_block(const ConvShape& s, const Padded& pd, const float* xpad,
                  const std::vector<int64_t>& off, const float* gt, int64_t ldgt, float* C,
                  int64_t Og, int64_t n0) {
  const int64_t K = int64_t(off.size());
  const int cols = int(std::min<int64_t>(16 * NV, Og - n0));
  int64_t o[MR];
  for (int64_t k0 = 0; k0 < K; k0 += MR) {
    const int rows = int(std::min<int64_t>(MR, K - k0));
    // A short last block repeats its last row (computed, not stored): one kernel per shape.
    for (int i = 0; i < MR; ++i) o[i] = off[size_t(k0 + std::min(i, rows - 1))];
    block<MR, NV>(s, pd, xpad, o, gt + n0, ldgt, C + k0 * Og + n0, Og, rows, cols);
  }
}

#endif  // FASTCLIP_CONV_AVX512

std::atomic<bool> g_enabled{true};

}  // namespace

bool conv_direct_fused_available() {
#ifdef FASTCLIP_CONV_AVX512
  return g_enabled.load(std::memory_order_relaxed) && isa_level() >= kIsaAvx512;
#else
  return false;
#endif
}

bool set_conv_direct_fused(bool enabled) { return g_enabled.exchange(enabled); }

bool conv_direct_fused_fits(const ConvShape& s, int64_t Og) {
  if (s.out[2] < kMinLine || Og < 1) return false;
  const Padded pd = padded_dims(s);
  const int64_t Cg = s.C / s.groups;
  const double xp = double(Cg) * double(pd.channel());
  const double gtn = double(s.positions()) * double(padded_cols(Og));
  return xp <= double(kConvUnfoldBudget) && gtn <= double(kConvUnfoldBudget);
}

void conv_direct_fused(const ConvShape& s, const float* xi, int64_t c0, const float* G, int64_t ldg,
                       int64_t Og, std::vector<float>& xpad, std::vector<float>& gt, float* C) {
#ifdef FASTCLIP_CONV_AVX512
  const Padded pd = padded_dims(s);
  const int64_t Cg = s.C / s.groups, P = s.positions(), ldgt = padded_cols(Og);
  const int64_t Hp = pd.Hp, Wp = pd.Wp, chan = pd.channel();
  // The example's channels, zero-padded: U's row (ch, a, b, e) at output (od, oh, ow) is
  // xpad[ch][od s0 + a dil0][oh s1 + b dil1][ow s2 + e dil2].
  xpad.assign(size_t(Cg * chan), 0.0f);
  for (int64_t ch = 0; ch < Cg; ++ch)
    for (int64_t d = 0; d < s.in[0]; ++d)
      for (int64_t h = 0; h < s.in[1]; ++h) {
        const float* src = xi + (c0 + ch) * s.xs[1] + d * s.xs[2] + h * s.xs[3];
        float* dst = xpad.data() + ch * chan + ((d + s.pad_lo[0]) * Hp + h + s.pad_lo[1]) * Wp +
                     s.pad_lo[2];
        if (s.xs[4] == 1)
          std::memcpy(dst, src, sizeof(float) * size_t(s.in[2]));
        else
          for (int64_t w = 0; w < s.in[2]; ++w) dst[w] = src[w * s.xs[4]];
      }
  // G transposed to P x ldgt (16 x 16 register tiles: an element-wise transpose was most of the
  // time of a 3-channel layer, whose K = 27 products are short), its columns past Og zero (full
  // vector loads, masked stores).
  gt.resize(size_t(P * ldgt));
  transpose_f32(Og, P, G, ldg, gt.data(), ldgt);
  for (int64_t p = 0; p < P; ++p)
    std::fill(gt.data() + p * ldgt + Og, gt.data() + (p + 1) * ldgt, 0.0f);
  // Row offsets in the padded input, in the weight's (ch, a, b, e) order.
  const int64_t K = s.cols();
  std::vector<int64_t> off(static_cast<size_t>(K));
  int64_t r = 0;
  for (int64_t ch = 0; ch < Cg; ++ch)
    for (int64_t a = 0; a < s.k[0]; ++a)
      for (int64_t b = 0; b < s.k[1]; ++b)
        for (int64_t e = 0; e < s.k[2]; ++e)
          off[size_t(r++)] = ch * chan + a * s.dil[0] * Hp * Wp + b * s.dil[1] * Wp + e * s.dil[2];
  // Column blocks of 64 (4 vectors), the last one as narrow as Og leaves it.
  for (int64_t n0 = 0; n0 < Og; n0 += 64) {
    switch (std::min<int64_t>(4, (Og - n0 + 15) / 16)) {
      case 1: column_block<8, 1>(s, pd, xpad.data(), off, gt.data(), ldgt, C, Og, n0); break;
      case 2: column_block<8, 2>(s, pd, xpad.data(), off, gt.data(), ldgt, C, Og, n0); break;
      case 3: column_block<6, 3>(s, pd, xpad.data(), off, gt.data(), ldgt, C, Og, n0); break;
      default: column_block<6, 4>(s, pd, xpad.data(), off, gt.data(), ldgt, C, Og, n0); break;
    }
  }
#else
  (void)s, (void)xi, (void)c0, (void)G, (void)ldg, (void)Og, (void)xpad, (void)gt, (void)C;
  throw std::logic_error("conv_direct_fused is not built for this target");
#endif
}

}  // namespace fastclip
