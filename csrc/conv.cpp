#include "conv.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "conv_direct.h"

namespace fastclip {
namespace {

// kConvTile and kConvUnfoldBudget (conv.h): the ghost tile and the per-thread unfold budget.
constexpr int64_t kTile = kConvTile;
constexpr int64_t kUnfoldBudget = kConvUnfoldBudget;
// Direct holds one group's per-example gradient (Og x K) per thread; auto does not pick it above
// this size (64 MiB of float32), ghost's memory is bounded by the tiles instead.
constexpr int64_t kDirectMaxElems = int64_t(1) << 24;
// Below this many flops for the whole call, waking the pool costs more than it saves.
constexpr double kSerialFlops = 4e6;

std::string dims(const int64_t* v) {
  return "(" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + ", " + std::to_string(v[2]) + ")";
}

// Columns [t0, t0 + n) of example xi's unfolded input for the group starting at channel c0, into
// U (K rows, leading dimension ldu). Row r = ((ch k0 + a) k1 + b) k2 + e is the weight's flattened
// (C/groups, k0, k1, k2) index, column t the output position (od, oh, ow) in row-major order.
// Positions reading the zero padding get 0.
//
// The layout of a row depends only on its tap (a, b, e), not on its channel: per tap the columns
// are cut once into output-line segments (zeros, a copy from one input line, zeros), and every
// channel's row replays them. The index arithmetic (divisions included) is per tap and line, the
// per-element work a plain copy: this keeps the unfold well below the cost of the product that
// reads it (it was as slow as the GEMM with the arithmetic per row and line).
constexpr int64_t kUnfoldLines = kConvUnfoldLines;

struct UnfoldSeg {
  int64_t len;   // columns of this segment (one output line, or the part of it in range)
  int64_t pre;   // leading zeros
  int64_t copy;  // then this many copied elements (the rest of len is zeros)
  int64_t src;   // element offset of the first copied element from the channel's origin
};

// GCC would turn the short copy and zero loops into memcpy / memset calls, whose call overhead
// is most of the cost for segments of a few elements (conv3 of the cnn bench: 4x slower).
#if defined(__GNUC__) && !defined(__clang__)
#define FASTCLIP_INLINE_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define FASTCLIP_INLINE_LOOPS
#endif

template <class T>
FASTCLIP_INLINE_LOOPS void unfold(const ConvShape& s, const T* xi, int64_t c0, int64_t t0, int64_t n,
                                  T* U, int64_t ldu, std::vector<UnfoldSeg>& segs) {
  if (n <= 0) return;
  const int64_t Cg = s.C / s.groups;
  const int64_t Ho = s.out[1], Wo = s.out[2], HWo = Ho * Wo;
  const int64_t sw = s.stride[2], xs4 = s.xs[4], step = sw * xs4;
  const int64_t end = t0 + n;
  // First output position of the range (n > 0, so P = D H W > 0 and HWo, Wo > 0).
  const int64_t od0 = t0 / HWo, rem0 = t0 - od0 * HWo, oh0 = rem0 / Wo, ow0 = rem0 - oh0 * Wo;
  const int64_t taps = s.k[0] * s.k[1] * s.k[2];
  // Lines are taken kUnfoldLines at a time, so the segment list stays small (32 KiB) even when
  // every line is a single column (a 1-D range over D or H with Wo = 1).
  int64_t t = t0, od = od0, oh = oh0, ow = ow0;
  while (t < end) {
    int64_t t_next = t, od_next = od, oh_next = oh;
    int64_t tap = 0;
    for (int64_t a = 0; a < s.k[0]; ++a) {
      const int64_t offd = a * s.dil[0] - s.pad_lo[0];
      for (int64_t b = 0; b < s.k[1]; ++b) {
        const int64_t offh = b * s.dil[1] - s.pad_lo[1];
        for (int64_t e = 0; e < s.k[2]; ++e, ++tap) {
          const int64_t offw = e * s.dil[2] - s.pad_lo[2];
          // ow is valid iff 0 <= ow sw + offw < W: ow in [ow_lo, ow_hi).
          const int64_t ow_lo = offw >= 0 ? 0 : (-offw + sw - 1) / sw;
          const int64_t ow_hi = s.in[2] - 1 - offw < 0 ? 0 : std::min(Wo, (s.in[2] - 1 - offw) / sw + 1);
          segs.clear();
          int64_t tl = t, dl = od, hl = oh, wl = ow;
          while (tl < end && int64_t(segs.size()) < kUnfoldLines) {
            const int64_t run = std::min(Wo - wl, end - tl);
            const int64_t id = dl * s.stride[0] + offd, ih = hl * s.stride[1] + offh;
            UnfoldSeg sg{run, run, 0, 0};
            if (!(id < 0 || id >= s.in[0] || ih < 0 || ih >= s.in[1] || ow_lo >= ow_hi)) {
              const int64_t a1 = wl + run;
              const int64_t v0 = std::clamp(ow_lo, wl, a1), v1 = std::clamp(ow_hi, v0, a1);
              sg.pre = v0 - wl;
              sg.copy = v1 - v0;
              sg.src = id * s.xs[2] + ih * s.xs[3] + (v0 * sw + offw) * xs4;
            }
            segs.push_back(sg);
            tl += run;
            wl = 0;
            if (++hl == Ho) {
              hl = 0;
              ++dl;
            }
          }
          t_next = tl;  // the same for every tap: the lines do not depend on the tap
          od_next = dl;
          oh_next = hl;
          for (int64_t ch = 0; ch < Cg; ++ch) {
            const T* xc = xi + (c0 + ch) * s.xs[1];
            T* o = U + (ch * taps + tap) * ldu + (t - t0);
            for (const UnfoldSeg& sg : segs) {
              int64_t q = 0;
              for (; q < sg.pre; ++q) o[q] = T(0);
              const T* src = xc + sg.src;
              T* dst = o + sg.pre;
              if (step == 1) {
                for (int64_t j = 0; j < sg.copy; ++j) dst[j] = src[j];
              } else {
                for (int64_t j = 0; j < sg.copy; ++j) dst[j] = src[j * step];
              }
              for (q = sg.pre + sg.copy; q < sg.len; ++q) o[q] = T(0);
              o += sg.len;
            }
          }
        }
      }
    }
    t = t_next;
    od = od_next;
    oh = oh_next;
    ow = 0;
  }
}

double ghost_flops(int64_t P, int64_t K, int64_t Og) {
  // Tile pairs (I, J >= I) by GEMM: ~P^2 + P * tile products of length K + Og, plus the combine.
  return (double(K) + double(Og) + 1.0) * (double(P) * double(P) + double(P) * double(std::min(P, kTile)));
}
double direct_flops(int64_t P, int64_t K, int64_t Og) {
  return (2.0 * double(P) + 2.0) * double(K) * double(Og);
}

// Per-thread scratch, sized for one (example, group) item and reused across the thread's items.
template <class T>
struct Scratch {
  std::vector<T> U, U2, S, C, acc;
  std::vector<float> xpad, gt;  // conv_direct_fused's padded input and transposed G
  std::vector<UnfoldSeg> segs;
};

// Stride 1, one tile: U^T U from the Gram matrix of the zero-padded input instead of the unfold.
// With stride 1 the unfolded column of output p under tap t is the padded input at position
// a(p) + o(t) (a: p in padded coordinates, o: the tap's offset), so
//   (U^T U)[p, q] = sum_t Gx[a(p) + o(t), a(q) + o(t)],   Gx = Xp^T Xp (Pin x Pin, Cg rows),
// which costs Pin^2 Cg / 2 (SYRK) + taps P^2 adds instead of P^2 K / 2 + the K x P unfold
// (K = Cg taps): for the 8 x 8 maps of a 3 x 3 conv, Pin = 100 against 9 x 64 = 576 per channel.
bool ghost_gram_fits(const ConvShape& s, int64_t P, int64_t K) {
  if (s.stride[0] != 1 || s.stride[1] != 1 || s.stride[2] != 1 || P > kTile) return false;
  const int64_t Cg = s.C / s.groups;
  int64_t Pin = 1;
  for (int j = 0; j < 3; ++j) Pin *= s.in[j] + s.pad_lo[j] + s.pad_hi[j];
  if (Pin > kConvGramMax || Cg * Pin > kUnfoldBudget) return false;
  // Gram + gather against the unfold's SYRK (both halves of a triangle) and its copy.
  const double taps = double(K / std::max<int64_t>(Cg, 1));
  const double gram = double(Pin) * double(Pin) * double(Cg) + 2.0 * taps * double(P) * double(P);
  const double unfold = double(P) * double(P) * double(K) + 4.0 * double(K) * double(P);
  return gram < unfold;
}

template <class T>
double ghost_gram_item(const ConvShape& s, const T* xi, int64_t c0, const T* G, int64_t ldg,
                       int64_t Og, Scratch<T>& w) {
  const int64_t P = s.positions(), Cg = s.C / s.groups;
  int64_t n[3];
  for (int j = 0; j < 3; ++j) n[j] = s.in[j] + s.pad_lo[j] + s.pad_hi[j];
  const int64_t Pin = n[0] * n[1] * n[2];
  // Xp: Cg x Pin, the group's channels zero-padded.
  w.U.assign(size_t(Cg * Pin), T(0));
  for (int64_t ch = 0; ch < Cg; ++ch) {
    const T* xc = xi + (c0 + ch) * s.xs[1];
    T* o = w.U.data() + ch * Pin;
    for (int64_t d = 0; d < s.in[0]; ++d)
      for (int64_t h = 0; h < s.in[1]; ++h) {
        T* row = o + ((d + s.pad_lo[0]) * n[1] + h + s.pad_lo[1]) * n[2] + s.pad_lo[2];
        const T* src = xc + d * s.xs[2] + h * s.xs[3];
        for (int64_t ww = 0; ww < s.in[2]; ++ww) row[ww] = src[ww * s.xs[4]];
      }
  }
  // Gx, upper triangle by SYRK. The gather below reads a whole output line of q from p's own,
  // so its q < p entries read Gx's (unspecified, but initialised) lower triangle: those SU
  // entries are never read (the combine takes SU's diagonal and strict upper triangle).
  w.C.resize(size_t(Pin * Pin));
  T* Gx = w.C.data();
  blas::syrk_upper_t(Pin, Cg, w.U.data(), Pin, Gx, Pin);
  w.S.resize(size_t(2 * kTile * kTile));
  T* SU = w.S.data();
  T* SG = SU + kTile * kTile;
  // SU[p, q >= p] = sum over taps of Gx[a(p) + o, a(q) + o], one output line of q at a time.
  const int64_t Ho = s.out[1], Wo = s.out[2];
  for (int64_t p = 0; p < P; ++p) std::fill(SU + p * kTile, SU + p * kTile + P, T(0));
  for (int64_t a = 0; a < s.k[0]; ++a)
    for (int64_t b = 0; b < s.k[1]; ++b)
      for (int64_t e = 0; e < s.k[2]; ++e) {
        const int64_t off = ((a * s.dil[0]) * n[1] + b * s.dil[1]) * n[2] + e * s.dil[2];
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pd = p / (Ho * Wo), ph = (p / Wo) % Ho, pw = p % Wo;
          const T* grow = Gx + ((pd * n[1] + ph) * n[2] + pw + off) * Pin + off;
          T* su = SU + p * kTile;
          int64_t qd = pd, qh = ph;
          for (int64_t q0 = p - pw; q0 < P; q0 += Wo) {  // output lines from p's own
            const T* __restrict__ gline = grow + (qd * n[1] + qh) * n[2];
            T* __restrict__ sline = su + q0;
            for (int64_t q = 0; q < Wo; ++q) sline[q] += gline[q];
            if (++qh == Ho) {
              qh = 0;
              ++qd;
            }
          }
        }
      }
  blas::syrk_upper_t(P, Og, G, ldg, SG, kTile);
  double diag = 0.0, upper = 0.0;
  for (int64_t r = 0; r < P; ++r) {
    diag += double(SU[r * kTile + r]) * double(SG[r * kTile + r]);
    upper += dot(SU + r * kTile + r + 1, SG + r * kTile + r + 1, P - r - 1);
  }
  return diag + 2.0 * upper;
}

// ||G U^T||^2 = <U^T U, G^T G> over P x P, visiting tile pairs (I, J >= I) once; off-diagonal
// pairs count twice. U is either fully unfolded (full) or unfolded per tile. A diagonal tile is
// the Gram matrix of one factor's columns: SYRK forms its upper triangle only (half the flops of
// a GEMM), and the combine reads the diagonal once and the strict upper triangle twice.
template <class T>
double ghost_item(const ConvShape& s, const T* xi, int64_t c0, const T* G, int64_t ldg, int64_t Og,
                  Scratch<T>& w) {
  const int64_t P = s.positions(), K = s.cols();
  if (ghost_gram_fits(s, P, K)) return ghost_gram_item(s, xi, c0, G, ldg, Og, w);
  const bool full = K * P <= kUnfoldBudget;
  if (full) {
    w.U.resize(size_t(K * P));
    unfold(s, xi, c0, 0, P, w.U.data(), P, w.segs);
  } else {
    w.U.resize(size_t(K * kTile));
    w.U2.resize(size_t(K * kTile));
  }
  w.S.resize(size_t(2 * kTile * kTile));
  T* SU = w.S.data();
  T* SG = SU + kTile * kTile;
  // Columns j0..j0+n of the unfolded input: a view of the full unfold, or unfolded into buf.
  auto cols = [&](int64_t j0, int64_t n, T* buf, int64_t& ld) -> const T* {
    if (full) {
      ld = P;
      return w.U.data() + j0;
    }
    unfold(s, xi, c0, j0, n, buf, n, w.segs);
    ld = n;
    return buf;
  };
  double total = 0.0;
  for (int64_t i0 = 0; i0 < P; i0 += kTile) {
    const int64_t ni = std::min(kTile, P - i0);
    int64_t ldi;
    const T* UI = cols(i0, ni, w.U.data(), ldi);
    // Diagonal tile: upper triangles by SYRK.
    blas::syrk_upper_t(ni, K, UI, ldi, SU, kTile);
    blas::syrk_upper_t(ni, Og, G + i0, ldg, SG, kTile);
    double diag = 0.0, upper = 0.0;
    for (int64_t r = 0; r < ni; ++r) {
      diag += double(SU[r * kTile + r]) * double(SG[r * kTile + r]);
      upper += dot(SU + r * kTile + r + 1, SG + r * kTile + r + 1, ni - r - 1);
    }
    total += diag + 2.0 * upper;
    for (int64_t j0 = i0 + kTile; j0 < P; j0 += kTile) {
      const int64_t nj = std::min(kTile, P - j0);
      int64_t ldj;
      const T* UJ = cols(j0, nj, w.U2.data(), ldj);
      blas::gemm_tn(ni, nj, K, UI, ldi, UJ, ldj, SU, kTile);
      blas::gemm_tn(ni, nj, Og, G + i0, ldg, G + j0, ldg, SG, kTile);
      double part = 0.0;
      for (int64_t r = 0; r < ni; ++r) part += dot(SU + r * kTile, SG + r * kTile, nj);
      total += 2.0 * part;
    }
  }
  return total;
}

// ||G U^T||^2 by forming the per-example gradient, accumulated over position chunks when the
// whole unfold would exceed the budget. The product is formed transposed, K x Og = U G^T: the same
// flops, but OpenBLAS runs this orientation 5-25% faster on the conv shapes (K >= Og, P the
// reduction), and the norm does not care.
// out (nullable): where to leave the K x Og product (the caller keeps it), else thread scratch.
template <class T>
double direct_item(const ConvShape& s, const T* xi, int64_t c0, const T* G, int64_t ldg, int64_t Og,
                   Scratch<T>& w, T* out) {
  const int64_t P = s.positions(), K = s.cols();
  if constexpr (std::is_same_v<T, float>) {
    if (conv_direct_fused_available() && conv_direct_fused_fits(s, Og)) {
      if (!out) w.C.resize(size_t(Og * K));
      T* C = out ? out : w.C.data();
      conv_direct_fused(s, xi, c0, G, ldg, Og, w.xpad, w.gt, C);
      return sum_sq(C, Og * K);
    }
  }
  const int64_t chunk = std::max<int64_t>(kTile, kUnfoldBudget / std::max<int64_t>(K, 1));
  if (P <= chunk) {
    w.U.resize(size_t(K * P));
    unfold(s, xi, c0, 0, P, w.U.data(), P, w.segs);
    if (!out) w.C.resize(size_t(Og * K));
    T* C = out ? out : w.C.data();
    blas::gemm_nt(K, Og, P, w.U.data(), P, G, ldg, C, Og);
    return sum_sq(C, Og * K);
  }
  w.C.resize(size_t(Og * K));
  w.U.resize(size_t(K * chunk));
  w.acc.assign(size_t(Og * K), T(0));
  for (int64_t t0 = 0; t0 < P; t0 += chunk) {
    const int64_t nc = std::min(chunk, P - t0);
    unfold(s, xi, c0, t0, nc, w.U.data(), nc, w.segs);
    blas::gemm_nt(K, Og, nc, w.U.data(), nc, G + t0, ldg, w.C.data(), Og);
    T* acc = w.acc.data();
    const T* c = w.C.data();
    for (int64_t q = 0; q < Og * K; ++q) acc[q] += c[q];
  }
  if (out) std::copy(w.acc.begin(), w.acc.end(), out);
  return sum_sq(w.acc.data(), Og * K);
}

}  // namespace

ConvMethod parse_conv_method(const std::string& name) {
  if (name == "auto") return ConvMethod::Auto;
  if (name == "ghost") return ConvMethod::Ghost;
  if (name == "direct") return ConvMethod::Direct;
  throw ArgumentError("method must be 'auto', 'ghost' or 'direct', got '" + name + "'");
}

const char* conv_method_name(ConvMethod method) {
  switch (method) {
    case ConvMethod::Auto: return "auto";
    case ConvMethod::Ghost: return "ghost";
    case ConvMethod::Direct: return "direct";
  }
  return "?";
}

ConvMethod choose_conv_method(int64_t P, int64_t K, int64_t Og) {
  if (K * Og > kDirectMaxElems) return ConvMethod::Ghost;
  return ghost_flops(P, K, Og) < direct_flops(P, K, Og) ? ConvMethod::Ghost : ConvMethod::Direct;
}

void check_conv_shape(const ConvShape& s) {
  check(s.B >= 0 && s.C >= 0 && s.O >= 0, "sizes must be >= 0, got B=" + std::to_string(s.B) +
                                               ", C_in=" + std::to_string(s.C) + ", C_out=" +
                                               std::to_string(s.O));
  check(s.groups >= 1, "groups must be >= 1, got " + std::to_string(s.groups));
  check(s.C % s.groups == 0, "input channels (" + std::to_string(s.C) +
                                 ") are not divisible by groups (" + std::to_string(s.groups) + ")");
  check(s.O % s.groups == 0, "output channels (" + std::to_string(s.O) +
                                 ") are not divisible by groups (" + std::to_string(s.groups) + ")");
  for (int j = 0; j < 3; ++j) {
    check(s.k[j] >= 1, "kernel sizes must be >= 1, got " + dims(s.k));
    check(s.stride[j] >= 1, "strides must be >= 1, got " + dims(s.stride));
    check(s.dil[j] >= 1, "dilations must be >= 1, got " + dims(s.dil));
    check(s.pad_lo[j] >= 0 && s.pad_hi[j] >= 0,
          "paddings must be >= 0, got " + dims(s.pad_lo) + " before and " + dims(s.pad_hi) + " after");
    check(s.in[j] >= 0 && s.out[j] >= 0, "spatial sizes must be >= 0");
  }
  int64_t expect[3];
  bool ok = true;
  for (int j = 0; j < 3; ++j) {
    const int64_t span = s.in[j] + s.pad_lo[j] + s.pad_hi[j] - s.dil[j] * (s.k[j] - 1) - 1;
    expect[j] = span < 0 ? 0 : span / s.stride[j] + 1;
    ok = ok && expect[j] == s.out[j];
  }
  check(ok, "output size " + dims(s.out) + " does not match input " + dims(s.in) + ", kernel " +
                dims(s.k) + ", stride " + dims(s.stride) + ", padding " + dims(s.pad_lo) + "/" +
                dims(s.pad_hi) + ", dilation " + dims(s.dil) + ", which give " + dims(expect));
  for (int j = 0; j < 5; ++j) check(s.xs[j] >= 0, "input strides must be >= 0");
  check(s.gs0 >= 0 && s.gs1 >= 0, "gradient strides must be >= 0");
}

template <class T>
void conv_sq_norms(const ConvShape& s, const T* x, const T* g, ConvMethod method, T* w_out,
                   T* b_out, int num_threads, T* pe_out, T* gb_out) {
  check_conv_shape(s);
  check(gb_out == nullptr || b_out != nullptr, "per-example bias gradients need the bias norms");
  check(num_threads >= 1, "num_threads must be >= 1, got " + std::to_string(num_threads));
  const int64_t B = s.B, groups = s.groups, P = s.positions(), K = s.cols(), Og = s.O / groups;
  const int64_t ldg = std::max<int64_t>(P, 1);
  if (method == ConvMethod::Auto) method = choose_conv_method(P, K, Og);
  check(pe_out == nullptr || method == ConvMethod::Direct,
        "per-example gradients are kept by the direct method only, got method '" +
            std::string(conv_method_name(method)) + "'");
  // A weightless group has a zero per-example gradient: no item writes it.
  if (pe_out && !(P > 0 && K > 0 && Og > 0)) std::fill(pe_out, pe_out + B * s.O * K, T(0));
  // A group with no weights (K = 0 or Og = 0) or no positions has a zero weight gradient.
  const bool weights = P > 0 && K > 0 && Og > 0;

  const double unfold_cost = 4.0 * double(K) * double(P);  // memory-bound: a few flops' worth
  const double per_item = (method == ConvMethod::Ghost ? ghost_flops(P, K, Og) : direct_flops(P, K, Og)) +
                          unfold_cost + double(Og) * double(P);
  const int64_t items = B * groups;
  const int threads = per_item * double(items) < kSerialFlops ? 1 : num_threads;

  // Per-(example, group) partial sums; the reduction over groups runs in a fixed order, so the
  // result does not depend on the thread count.
  std::vector<double> wpart(size_t(items), 0.0), bpart(b_out ? size_t(items) : 0, 0.0);
  const std::vector<T> ones(b_out ? size_t(P) : 0, T(1));
  parallel_for(items, threads, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i = it / groups, grp = it - i * groups;
      const T* xi = x + i * s.xs[0];
      const int64_t c0 = grp * (s.C / groups);
      const T* G = g + i * s.gs0 + grp * Og * s.gs1;
      const int64_t ldgr = Og > 1 ? s.gs1 : ldg;
      if (weights) {
        wpart[size_t(it)] = method == ConvMethod::Ghost ? ghost_item(s, xi, c0, G, ldgr, Og, scratch)
                                                        : direct_item(s, xi, c0, G, ldgr, Og, scratch,
                                                                      pe_out ? pe_out + it * Og * K : nullptr);
      }
      if (b_out) {
        // Row sums as dots with ones: the vectorised dot accumulates in double without the
        // one-add-per-cycle latency chain of a scalar loop.
        double bsq = 0.0;
        for (int64_t o = 0; o < Og; ++o) {
          const double acc = dot(G + o * ldgr, ones.data(), P);
          if (gb_out) gb_out[i * s.O + grp * Og + o] = static_cast<T>(acc);
          bsq += acc * acc;
        }
        bpart[size_t(it)] = bsq;
      }
    }
  });
  for (int64_t i = 0; i < B; ++i) {
    double w = 0.0, b = 0.0;
    for (int64_t grp = 0; grp < groups; ++grp) {
      w += wpart[size_t(i * groups + grp)];
      if (b_out) b += bpart[size_t(i * groups + grp)];
    }
    w_out[i] = static_cast<T>(w);
    if (b_out) b_out[i] = static_cast<T>(b);
  }
}

template void conv_sq_norms<float>(const ConvShape&, const float*, const float*, ConvMethod, float*,
                                   float*, int, float*, float*);
template void conv_sq_norms<double>(const ConvShape&, const double*, const double*, ConvMethod,
                                    double*, double*, int, double*, double*);

}  // namespace fastclip
