#include "norm.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace fastclip {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTCLIP_NORM_MV __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define FASTCLIP_NORM_MV
#endif

// Reductions keep 8 independent double lanes: without -ffast-math the compiler may not reassociate
// one running sum, but it does vectorise the lanes. Each element is widened before it is used, so
// float32 inputs get double statistics (the variance is two-pass: no cancellation of E[x^2] - m^2).
constexpr int kLanes = 8;

template <class T>
inline double sum_impl(const T* x, int64_t n, double shift, bool square) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  if (square) {
    for (; i + kLanes <= n; i += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const double d = static_cast<double>(x[i + k]) - shift;
        acc[k] += d * d;
      }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(x[i + k]);
  }
  double s = 0.0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - (square ? shift : 0.0);
    s += square ? d * d : d;
  }
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// sum g * (x - m) and sum g over n positions.
template <class T>
inline void gsums_impl(const T* x, const T* g, int64_t n, double m, double* sw, double* sb) {
  double aw[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0}, ab[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const double gv = static_cast<double>(g[i + k]);
      aw[k] += gv * (static_cast<double>(x[i + k]) - m);
      ab[k] += gv;
    }
  double w = 0.0, b = 0.0;
  for (; i < n; ++i) {
    const double gv = static_cast<double>(g[i]);
    w += gv * (static_cast<double>(x[i]) - m);
    b += gv;
  }
  for (int k = 0; k < kLanes; ++k) {
    w += aw[k];
    b += ab[k];
  }
  *sw = w;
  *sb = b;
}

// One pass over a channel: with d = x - x0 (x0 a value of the same group, so that the shifted
// moments do not cancel for typical data), out = {sum d, sum d^2, sum g, sum g d}. The caller
// checks the shift and falls back to the two-pass formulas when mean(d)^2 is large against var.
template <class T>
inline void moments_impl(const T* x, const T* g, int64_t n, double x0, double* out) {
  double a1[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0}, a2[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  double ag[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0}, agd[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(x[i + k]) - x0, gv = static_cast<double>(g[i + k]);
      a1[k] += d;
      a2[k] += d * d;
      ag[k] += gv;
      agd[k] += gv * d;
    }
  double s1 = 0.0, s2 = 0.0, sg = 0.0, sgd = 0.0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - x0, gv = static_cast<double>(g[i]);
    s1 += d;
    s2 += d * d;
    sg += gv;
    sgd += gv * d;
  }
  for (int k = 0; k < kLanes; ++k) {
    s1 += a1[k];
    s2 += a2[k];
    sg += ag[k];
    sgd += agd[k];
  }
  out[0] = s1;
  out[1] = s2;
  out[2] = sg;
  out[3] = sgd;
}

// sum d and sum d^2 of a row, d = x - x0.
template <class T>
inline void row_moments_impl(const T* x, int64_t n, double x0, double* s1_out, double* s2_out) {
  double a1[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0}, a2[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(x[i + k]) - x0;
      a1[k] += d;
      a2[k] += d * d;
    }
  double s1 = 0.0, s2 = 0.0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - x0;
    s1 += d;
    s2 += d * d;
  }
  for (int k = 0; k < kLanes; ++k) {
    s1 += a1[k];
    s2 += a2[k];
  }
  *s1_out = s1;
  *s2_out = s2;
}

// aw[k] += g[k] * (x[k] - m) * r; ab[k] += g[k] (ab may be null): elementwise, vectorises as is.
template <class T>
inline void row_update_impl(const T* x, const T* g, int64_t n, double m, double r, double* aw,
                            double* ab) {
  if (ab) {
    for (int64_t k = 0; k < n; ++k) {
      const double gv = static_cast<double>(g[k]);
      aw[k] += gv * ((static_cast<double>(x[k]) - m) * r);
      ab[k] += gv;
    }
  } else {
    for (int64_t k = 0; k < n; ++k)
      aw[k] += static_cast<double>(g[k]) * ((static_cast<double>(x[k]) - m) * r);
  }
}

// Non-template entry points, one clone per ISA (target_clones does not apply to templates).
FASTCLIP_NORM_MV void moments(const float* x, const float* g, int64_t n, double x0, double* out) {
  moments_impl(x, g, n, x0, out);
}
FASTCLIP_NORM_MV void moments(const double* x, const double* g, int64_t n, double x0, double* out) {
  moments_impl(x, g, n, x0, out);
}
FASTCLIP_NORM_MV void row_moments(const float* x, int64_t n, double x0, double* s1, double* s2) {
  row_moments_impl(x, n, x0, s1, s2);
}
FASTCLIP_NORM_MV void row_moments(const double* x, int64_t n, double x0, double* s1, double* s2) {
  row_moments_impl(x, n, x0, s1, s2);
}
FASTCLIP_NORM_MV double sum_of(const float* x, int64_t n) { return sum_impl(x, n, 0.0, false); }
FASTCLIP_NORM_MV double sum_of(const double* x, int64_t n) { return sum_impl(x, n, 0.0, false); }
FASTCLIP_NORM_MV double sum_sq_dev(const float* x, int64_t n, double m) { return sum_impl(x, n, m, true); }
FASTCLIP_NORM_MV double sum_sq_dev(const double* x, int64_t n, double m) { return sum_impl(x, n, m, true); }
FASTCLIP_NORM_MV void gsums(const float* x, const float* g, int64_t n, double m, double* sw, double* sb) {
  gsums_impl(x, g, n, m, sw, sb);
}
FASTCLIP_NORM_MV void gsums(const double* x, const double* g, int64_t n, double m, double* sw, double* sb) {
  gsums_impl(x, g, n, m, sw, sb);
}
FASTCLIP_NORM_MV void row_update(const float* x, const float* g, int64_t n, double m, double r,
                                 double* aw, double* ab) {
  row_update_impl(x, g, n, m, r, aw, ab);
}
FASTCLIP_NORM_MV void row_update(const double* x, const double* g, int64_t n, double m, double r,
                                 double* aw, double* ab) {
  row_update_impl(x, g, n, m, r, aw, ab);
}

// One-pass moments shifted by x0 are used only while mean(d)^2 <= kShiftRatio * var: the relative
// rounding error of var = E[d^2] - E[d]^2 then stays within (1 + kShiftRatio) * n * 2^-53, far
// below float32 resolution and the float64 tests' 1e-10. Otherwise (x0 an outlier of its group,
// or a mean far from zero against the spread) the exact two-pass formulas run instead.
constexpr double kShiftRatio = 16.0;

// Below this many elements the pool's wake-up costs more than the work.
constexpr int64_t kSerialElements = int64_t(1) << 15;

template <class T>
void check_pair(const View3<T>& x, const View3<T>& g) {
  check(x.n0 == g.n0, "batch sizes differ: " + std::to_string(x.n0) + " vs " + std::to_string(g.n0));
  check(x.n1 == g.n1 && x.n2 == g.n2,
        "x and g shapes differ: (" + std::to_string(x.n0) + ", " + std::to_string(x.n1) + ", " +
            std::to_string(x.n2) + ") vs (" + std::to_string(g.n0) + ", " + std::to_string(g.n1) +
            ", " + std::to_string(g.n2) + ")");
}

void check_eps(double eps) {
  check(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got " + std::to_string(eps));
}

}  // namespace

template <class T>
void last_dims_affine_grads(const View3<T>& x, const View3<T>& g, bool rms, double eps, T* gw,
                            T* gb, int num_threads) {
  check_pair(x, g);
  check_eps(eps);
  const int64_t B = x.n0, Tn = x.n1, N = x.n2;
  if (B == 0 || N == 0) return;
  const int outs = gb ? 2 : 1;
  if (B * Tn * N < kSerialElements) num_threads = 1;
  // With few examples and many rows, each example's rows are split into K chunks whose partial
  // sums are added at the end, so a single long sequence still uses every thread.
  int64_t K = 1;
  if (num_threads > 1 && B < 2 * num_threads) K = std::max<int64_t>(1, std::min<int64_t>(Tn, (4 * num_threads + B - 1) / B));
  const int64_t rows_per = K > 1 ? (Tn + K - 1) / K : Tn;
  std::vector<double> partial(K > 1 ? size_t(B * K * outs * N) : 0);
  const double inv_n = 1.0 / static_cast<double>(N);

  parallel_for(B * K, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<double> local(K > 1 ? 0 : size_t(outs * N));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / K, k = item % K;
      double* aw = K > 1 ? partial.data() + size_t(item * outs * N) : local.data();
      double* ab = gb ? aw + N : nullptr;
      std::fill(aw, aw + outs * N, 0.0);
      const int64_t t1 = std::min(Tn, (k + 1) * rows_per);
      for (int64_t t = k * rows_per; t < t1; ++t) {
        const T* xr = x.row(i, t);
        const T* gr = g.row(i, t);
        double m = 0.0, var;
        if (rms) {
          var = sum_sq_dev(xr, N, 0.0) * inv_n;  // mean of squares
        } else {
          const double x0 = static_cast<double>(xr[0]);
          double s1, s2;
          row_moments(xr, N, x0, &s1, &s2);
          const double md = s1 * inv_n;
          var = s2 * inv_n - md * md;  // biased, as torch
          m = x0 + md;
          if (!(md * md <= kShiftRatio * var)) {  // cancellation (or NaN): exact two passes
            m = sum_of(xr, N) * inv_n;
            var = sum_sq_dev(xr, N, m) * inv_n;
          }
        }
        row_update(xr, gr, N, m, 1.0 / std::sqrt(var + eps), aw, ab);
      }
      if (K == 1) {
        for (int64_t n = 0; n < N; ++n) gw[i * N + n] = static_cast<T>(aw[n]);
        if (gb)
          for (int64_t n = 0; n < N; ++n) gb[i * N + n] = static_cast<T>(ab[n]);
      }
    }
  });
  if (K == 1) return;
  for (int64_t i = 0; i < B; ++i)
    for (int o = 0; o < outs; ++o) {
      T* out = (o == 0 ? gw : gb) + i * N;
      for (int64_t n = 0; n < N; ++n) {
        double s = 0.0;
        for (int64_t k = 0; k < K; ++k) s += partial[size_t(((i * K + k) * outs + o) * N + n)];
        out[n] = static_cast<T>(s);
      }
    }
}

template <class T>
void channel_affine_grads(const View3<T>& x, const View3<T>& g, int64_t groups, double eps,
                          const double* mean, const double* var, T* gw, T* gb, int num_threads) {
  check_pair(x, g);
  check_eps(eps);
  const int64_t B = x.n0, C = x.n1, S = x.n2;
  check(groups >= 1, "groups must be >= 1, got " + std::to_string(groups));
  check(C % groups == 0, "groups (" + std::to_string(groups) + ") must divide the number of channels (" +
                             std::to_string(C) + ")");
  check((mean == nullptr) == (var == nullptr), "give both mean and var, or neither");
  check(mean == nullptr || groups == C,
        "per-channel statistics need groups == channels, got groups = " + std::to_string(groups) +
            ", channels = " + std::to_string(C));
  if (B == 0 || C == 0) return;
  const int64_t cpg = C / groups;
  const double n_group = static_cast<double>(cpg * S);
  if (B * C * S < kSerialElements) num_threads = 1;

  // One item = one (example, group): its statistics and its channels' outputs are its own, so the
  // items need no reduction; B * groups items keep every thread busy even for B = 1.
  parallel_for(B * groups, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<double> mom(size_t(mean ? 0 : 4 * cpg));  // per channel: sum d, d^2, g, g d
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / groups, c0 = (item % groups) * cpg;
      double m = 0.0, r = 0.0;
      if (!mean && S > 0) {
        // Fast path: one pass per channel gives the group's shifted moments and each channel's
        // sum g and sum g (x - x0); gw = r * (sum g (x - x0) - (m - x0) sum g).
        const double x0 = static_cast<double>(x.row(i, c0)[0]);
        double s1 = 0.0, s2 = 0.0;
        for (int64_t c = c0; c < c0 + cpg; ++c) {
          double* mo = &mom[size_t(4 * (c - c0))];
          moments(x.row(i, c), g.row(i, c), S, x0, mo);
          s1 += mo[0];
          s2 += mo[1];
        }
        const double md = s1 / n_group, var_fast = s2 / n_group - md * md;
        if (md * md <= kShiftRatio * var_fast) {
          r = 1.0 / std::sqrt(var_fast + eps);
          for (int64_t c = c0; c < c0 + cpg; ++c) {
            const double* mo = &mom[size_t(4 * (c - c0))];
            gw[i * C + c] = static_cast<T>((mo[3] - md * mo[2]) * r);
            if (gb) gb[i * C + c] = static_cast<T>(mo[2]);
          }
          continue;
        }
        // Cancellation (or NaN) in the shifted moments: exact two-pass statistics.
        double s = 0.0;
        for (int64_t c = c0; c < c0 + cpg; ++c) s += sum_of(x.row(i, c), S);
        m = s / n_group;
        double v = 0.0;
        for (int64_t c = c0; c < c0 + cpg; ++c) v += sum_sq_dev(x.row(i, c), S, m);
        r = 1.0 / std::sqrt(v / n_group + eps);
      }
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        if (mean) {
          m = mean[c];
          r = 1.0 / std::sqrt(var[c] + eps);
        }
        double sw = 0.0, sb = 0.0;
        if (S > 0) gsums(x.row(i, c), g.row(i, c), S, m, &sw, &sb);  // S = 0: empty sums
        gw[i * C + c] = static_cast<T>(S > 0 ? sw * r : 0.0);
        if (gb) gb[i * C + c] = static_cast<T>(sb);
      }
    }
  });
}

template void last_dims_affine_grads<float>(const View3<float>&, const View3<float>&, bool, double,
                                            float*, float*, int);
template void last_dims_affine_grads<double>(const View3<double>&, const View3<double>&, bool,
                                             double, double*, double*, int);
template void channel_affine_grads<float>(const View3<float>&, const View3<float>&, int64_t, double,
                                          const double*, const double*, float*, float*, int);
template void channel_affine_grads<double>(const View3<double>&, const View3<double>&, int64_t,
                                           double, const double*, const double*, double*, double*,
                                           int);

}  // namespace fastclip
