#include "conv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "blas.h"

namespace fastclip {
namespace {

// Ghost tiles are kTile x kTile blocks of the two P x P Gram matrices U^T U and G^T G, so the Gram
// buffers are 2 kTile^2 elements whatever P is.
constexpr int64_t kTile = 256;
// At most this many elements of one example's unfolded input are held per thread (16 MiB of
// float32). Bigger unfolds are built a position chunk (direct) or a tile (ghost) at a time.
constexpr int64_t kUnfoldBudget = int64_t(1) << 22;
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
// Positions reading the zero padding get 0. Each row is filled one output line (fixed od, oh) at a
// time, whose valid ow range is computed once, so the inner loop is a plain (strided) copy.
template <class T>
void unfold(const ConvShape& s, const T* xi, int64_t c0, int64_t t0, int64_t n, T* U, int64_t ldu) {
  const int64_t Cg = s.C / s.groups;
  const int64_t Wo = s.out[2], HWo = s.out[1] * s.out[2];
  const int64_t sw = s.stride[2], xs4 = s.xs[4];
  const int64_t end = t0 + n;
  int64_t r = 0;
  for (int64_t ch = 0; ch < Cg; ++ch) {
    const T* xc = xi + (c0 + ch) * s.xs[1];
    for (int64_t a = 0; a < s.k[0]; ++a) {
      const int64_t offd = a * s.dil[0] - s.pad_lo[0];
      for (int64_t b = 0; b < s.k[1]; ++b) {
        const int64_t offh = b * s.dil[1] - s.pad_lo[1];
        for (int64_t e = 0; e < s.k[2]; ++e, ++r) {
          const int64_t offw = e * s.dil[2] - s.pad_lo[2];
          // ow is valid iff 0 <= ow sw + offw < W: ow in [ow_lo, ow_hi).
          const int64_t ow_lo = offw >= 0 ? 0 : (-offw + sw - 1) / sw;
          const int64_t ow_hi = s.in[2] - 1 - offw < 0 ? 0 : std::min(Wo, (s.in[2] - 1 - offw) / sw + 1);
          T* row = U + r * ldu;
          int64_t t = t0;
          while (t < end) {
            const int64_t od = t / HWo, rem = t - od * HWo, oh = rem / Wo, ow = rem - oh * Wo;
            const int64_t run = std::min(Wo - ow, end - t);
            T* o = row + (t - t0);
            const int64_t id = od * s.stride[0] + offd, ih = oh * s.stride[1] + offh;
            if (id < 0 || id >= s.in[0] || ih < 0 || ih >= s.in[1] || ow_lo >= ow_hi) {
              std::fill(o, o + run, T(0));
            } else {
              const T* xr = xc + id * s.xs[2] + ih * s.xs[3];
              const int64_t a1 = ow + run;
              const int64_t v0 = std::clamp(ow_lo, ow, a1), v1 = std::clamp(ow_hi, v0, a1);
              std::fill(o, o + (v0 - ow), T(0));
              if (sw * xs4 == 1) {
                std::memcpy(o + (v0 - ow), xr + v0 + offw, size_t(v1 - v0) * sizeof(T));
              } else {
                for (int64_t q = v0; q < v1; ++q) o[q - ow] = xr[(q * sw + offw) * xs4];
              }
              std::fill(o + (v1 - ow), o + run, T(0));
            }
            t += run;
          }
        }
      }
    }
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
};

// ||G U^T||^2 = <U^T U, G^T G> over P x P, visiting tile pairs (I, J >= I) once; off-diagonal
// pairs count twice. U is either fully unfolded (full) or unfolded per tile.
template <class T>
double ghost_item(const ConvShape& s, const T* xi, int64_t c0, const T* G, int64_t ldg, int64_t Og,
                  Scratch<T>& w) {
  const int64_t P = s.positions(), K = s.cols();
  const bool full = K * P <= kUnfoldBudget;
  if (full) {
    w.U.resize(size_t(K * P));
    unfold(s, xi, c0, 0, P, w.U.data(), P);
  } else {
    w.U.resize(size_t(K * kTile));
    w.U2.resize(size_t(K * kTile));
  }
  w.S.resize(size_t(2 * kTile * kTile));
  T* SU = w.S.data();
  T* SG = SU + kTile * kTile;
  double total = 0.0;
  for (int64_t i0 = 0; i0 < P; i0 += kTile) {
    const int64_t ni = std::min(kTile, P - i0);
    const T* UI;
    int64_t ldi;
    if (full) {
      UI = w.U.data() + i0;
      ldi = P;
    } else {
      unfold(s, xi, c0, i0, ni, w.U.data(), ni);
      UI = w.U.data();
      ldi = ni;
    }
    for (int64_t j0 = i0; j0 < P; j0 += kTile) {
      const int64_t nj = std::min(kTile, P - j0);
      const T* UJ = UI;
      int64_t ldj = ldi;
      if (j0 != i0) {
        if (full) {
          UJ = w.U.data() + j0;
        } else {
          unfold(s, xi, c0, j0, nj, w.U2.data(), nj);
          UJ = w.U2.data();
          ldj = nj;
        }
      }
      blas::gemm_tn(ni, nj, K, UI, ldi, UJ, ldj, SU, kTile);
      blas::gemm_tn(ni, nj, Og, G + i0, ldg, G + j0, ldg, SG, kTile);
      double part = 0.0;
      for (int64_t r = 0; r < ni; ++r) part += dot(SU + r * kTile, SG + r * kTile, nj);
      total += j0 == i0 ? part : 2.0 * part;
    }
  }
  return total;
}

// ||G U^T||^2 by forming the Og x K per-example gradient, accumulated over position chunks when
// the whole unfold would exceed the budget.
// out (nullable): where to leave the Og x K product (the caller keeps it), else thread scratch.
template <class T>
double direct_item(const ConvShape& s, const T* xi, int64_t c0, const T* G, int64_t ldg, int64_t Og,
                   Scratch<T>& w, T* out) {
  const int64_t P = s.positions(), K = s.cols();
  const int64_t chunk = std::max<int64_t>(kTile, kUnfoldBudget / std::max<int64_t>(K, 1));
  w.C.resize(size_t(Og * K));
  if (P <= chunk) {
    w.U.resize(size_t(K * P));
    unfold(s, xi, c0, 0, P, w.U.data(), P);
    T* C = out ? out : w.C.data();
    blas::gemm_nt(Og, K, P, G, ldg, w.U.data(), P, C, K);
    return sum_sq(C, Og * K);
  }
  w.U.resize(size_t(K * chunk));
  w.acc.assign(size_t(Og * K), T(0));
  for (int64_t t0 = 0; t0 < P; t0 += chunk) {
    const int64_t nc = std::min(chunk, P - t0);
    unfold(s, xi, c0, t0, nc, w.U.data(), nc);
    blas::gemm_nt(Og, K, nc, G + t0, ldg, w.U.data(), nc, w.C.data(), K);
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
                   T* b_out, int num_threads, T* pe_out) {
  check_conv_shape(s);
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
                                   float*, int, float*);
template void conv_sq_norms<double>(const ConvShape&, const double*, const double*, ConvMethod,
                                    double*, double*, int, double*);

}  // namespace fastclip
