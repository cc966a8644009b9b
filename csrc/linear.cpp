#include "linear.h"

#include <algorithm>
#include <vector>

#include "blas.h"

namespace fastclip {
namespace {

// Ghost tiles are kGhostTile x kGhostTile blocks of the two T x T Gram matrices, so the per-thread
// buffer is 2 * kGhostTile^2 elements whatever T is.
constexpr int64_t kGhostTile = 256;
// Direct tiles are kDirectRows x kDirectCols blocks of the p x d product G_i^T A_i (<= 1 MiB of
// float32), big enough that each GEMM call still runs near peak.
constexpr int64_t kDirectRows = 128;
constexpr int64_t kDirectCols = 2048;
// Below this many flops for the whole call, waking the pool costs more than it saves.
constexpr double kSerialFlops = 4e6;
// Where OpenBLAS' GEMM has a small-matrix path (blas::small_gemm_beats_syrk), its SYRK is slower on
// small tiles: below this size the full GEMM, despite twice the flops, measured faster (Intel
// AVX-512 host). Elsewhere SYRK wins at every size.
constexpr int64_t kSyrkMinTile = 128;

// sum_{r,c} X[r,c] Y[r,c] over the upper triangle of two symmetric n x n tiles, with every
// off-diagonal entry counted twice (it stands for itself and its mirror).
template <class T>
double symmetric_dot(const T* X, const T* Y, int64_t n, int64_t ld) {
  double s = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    s += static_cast<double>(X[r * ld + r]) * static_cast<double>(Y[r * ld + r]);
    s += 2.0 * dot(X + r * ld + r + 1, Y + r * ld + r + 1, n - r - 1);
  }
  return s;
}

// Sum of the upper triangle of a symmetric n x n tile, every off-diagonal entry counted twice:
// the sum of all its entries.
template <class T>
double symmetric_sum(const T* X, int64_t n, int64_t ld) {
  double s = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    double row = 0.0;
    for (int64_t c = r + 1; c < n; ++c) row += static_cast<double>(X[r * ld + c]);
    s += static_cast<double>(X[r * ld + r]) + 2.0 * row;
  }
  return s;
}

// ||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T>, visiting only tile pairs (I, J) with J >= I: diagonal
// tiles by SYRK (upper triangle), off-diagonal tiles once by GEMM and counted twice.
// Cost ~ T^2 (d + p) flops. With ``bias``, also the bias norm ||sum_t g_t||^2 = 1^T (G_i G_i^T) 1,
// the sum of every entry of the Gram tiles already formed: T^2 additions instead of a T p pass.
template <class T>
double ghost_one(const View3<T>& A, const View3<T>& G, int64_t i, T* SA, T* SG,
                 double* bias = nullptr) {
  const int64_t n = A.n1, d = A.n2, p = G.n2;
  const T* a = A.slab(i);
  const T* g = G.slab(i);
  const int64_t syrk_min = blas::small_gemm_beats_syrk() ? kSyrkMinTile : 0;
  double s = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kGhostTile) {
    const int64_t ni = std::min(kGhostTile, n - i0);
    if (ni < syrk_min) {  // full tile; symmetric_dot reads only its upper triangle
      blas::gemm_nt(ni, ni, d, a + i0 * A.s1, A.s1, a + i0 * A.s1, A.s1, SA, kGhostTile);
      blas::gemm_nt(ni, ni, p, g + i0 * G.s1, G.s1, g + i0 * G.s1, G.s1, SG, kGhostTile);
    } else {
      blas::syrk_upper(ni, d, a + i0 * A.s1, A.s1, SA, kGhostTile);
      blas::syrk_upper(ni, p, g + i0 * G.s1, G.s1, SG, kGhostTile);
    }
    s += symmetric_dot(SA, SG, ni, kGhostTile);
    if (bias) *bias += symmetric_sum(SG, ni, kGhostTile);
    for (int64_t j0 = i0 + kGhostTile; j0 < n; j0 += kGhostTile) {
      const int64_t nj = std::min(kGhostTile, n - j0);
      blas::gemm_nt(ni, nj, d, a + i0 * A.s1, A.s1, a + j0 * A.s1, A.s1, SA, kGhostTile);
      blas::gemm_nt(ni, nj, p, g + i0 * G.s1, G.s1, g + j0 * G.s1, G.s1, SG, kGhostTile);
      for (int64_t r = 0; r < ni; ++r) s += 2.0 * dot(SA + r * kGhostTile, SG + r * kGhostTile, nj);
      if (bias) {
        for (int64_t r = 0; r < ni; ++r)
          for (int64_t c = 0; c < nj; ++c) *bias += 2.0 * static_cast<double>(SG[r * kGhostTile + c]);
      }
    }
  }
  return s;
}

// ||G_i^T A_i||^2 by forming G_i^T A_i one (rows of p) x (cols of d) tile at a time.
// Cost ~ 2 T d p flops.
template <class T>
double direct_one(const View3<T>& A, const View3<T>& G, int64_t i, T* C) {
  const int64_t n = A.n1, d = A.n2, p = G.n2;
  const int64_t cols = std::min(kDirectCols, d);
  double s = 0.0;
  for (int64_t r0 = 0; r0 < p; r0 += kDirectRows) {
    const int64_t nr = std::min(kDirectRows, p - r0);
    for (int64_t c0 = 0; c0 < d; c0 += cols) {
      const int64_t nc = std::min(cols, d - c0);
      blas::gemm_tn(nr, nc, n, G.slab(i) + r0, G.s1, A.slab(i) + c0, A.s1, C, cols);
      for (int64_t r = 0; r < nr; ++r) s += sum_sq(C + r * cols, nc);
    }
  }
  return s;
}

template <class T>
double bias_one(const View3<T>& G, int64_t i, double* acc) {
  const int64_t n = G.n1, p = G.n2;
  if (n == 1) return sum_sq(G.row(i, 0), p);
  std::fill(acc, acc + p, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const T* g = G.row(i, t);
    for (int64_t j = 0; j < p; ++j) acc[j] += static_cast<double>(g[j]);
  }
  return dot(acc, acc, p);
}

double ghost_flops(int64_t T, int64_t d, int64_t p) {
  return double(T) * double(T) * (double(d) + double(p) + 2.0);
}
double direct_flops(int64_t T, int64_t d, int64_t p) {
  return (2.0 * double(T) + 2.0) * double(d) * double(p);
}

}  // namespace

LinearMethod parse_linear_method(const std::string& name) {
  if (name == "auto") return LinearMethod::Auto;
  if (name == "product") return LinearMethod::Product;
  if (name == "ghost") return LinearMethod::Ghost;
  if (name == "direct") return LinearMethod::Direct;
  throw ArgumentError("method must be 'auto', 'product', 'ghost' or 'direct', got '" + name + "'");
}

const char* linear_method_name(LinearMethod method) {
  switch (method) {
    case LinearMethod::Auto: return "auto";
    case LinearMethod::Product: return "product";
    case LinearMethod::Ghost: return "ghost";
    case LinearMethod::Direct: return "direct";
  }
  return "?";
}

// Both methods are tiled, so memory is bounded either way and only flops decide: ghost needs
// ~T^2 (d + p) (half of each Gram matrix by symmetry, plus the T^2 combine), direct ~2 T d p
// (plus the d p sum of squares).
LinearMethod choose_linear_method(int64_t T, int64_t d, int64_t p) {
  if (T <= 1) return LinearMethod::Product;
  return ghost_flops(T, d, p) < direct_flops(T, d, p) ? LinearMethod::Ghost : LinearMethod::Direct;
}

template <class T>
void linear_sq_norms(const View3<T>& A, const View3<T>& G, LinearMethod method, T* w_out,
                     T* b_out, int num_threads) {
  check(A.n0 == G.n0, "batch sizes differ: " + std::to_string(A.n0) + " vs " + std::to_string(G.n0));
  check(A.n1 == G.n1, "positions differ: " + std::to_string(A.n1) + " vs " + std::to_string(G.n1));
  check(num_threads >= 1, "num_threads must be >= 1, got " + std::to_string(num_threads));
  const int64_t B = A.n0, n = A.n1, d = A.n2, p = G.n2;
  if (method == LinearMethod::Auto) method = choose_linear_method(n, d, p);
  check(method != LinearMethod::Product || n <= 1,
        "method 'product' needs T == 1, got T = " + std::to_string(n));
  // T == 1 makes every method the product ||a||^2 ||g||^2; T == 0 gives an empty sum.
  if (n <= 1) method = LinearMethod::Product;

  const double per_example = method == LinearMethod::Ghost    ? ghost_flops(n, d, p)
                             : method == LinearMethod::Direct ? direct_flops(n, d, p)
                                                              // memory-bound: ~10x a BLAS flop
                                                              : 10.0 * double(d + p);
  const int threads = per_example * double(B) < kSerialFlops ? 1 : num_threads;

  parallel_for(B, threads, [&](int64_t begin, int64_t end) {
    std::vector<T> buf;
    if (method == LinearMethod::Ghost) buf.resize(2 * kGhostTile * kGhostTile);
    if (method == LinearMethod::Direct) buf.resize(std::min(kDirectRows, p) * std::min(kDirectCols, d));
    std::vector<double> bias_acc(b_out ? p : 0);
    for (int64_t i = begin; i < end; ++i) {
      double w = 0.0, b = 0.0;
      bool b_done = false;
      if (n == 1) w = sum_sq(A.row(i, 0), d) * sum_sq(G.row(i, 0), p);
      else if (n > 0 && method == LinearMethod::Ghost) {
        w = ghost_one(A, G, i, buf.data(), buf.data() + kGhostTile * kGhostTile,
                      b_out ? &b : nullptr);
        b_done = true;
      } else if (n > 0 && method == LinearMethod::Direct) w = direct_one(A, G, i, buf.data());
      w_out[i] = static_cast<T>(w);
      if (b_out && !b_done) b = n == 0 ? 0.0 : bias_one(G, i, bias_acc.data());
      // A Gram sum of a gradient whose positions cancel can round below 0: a norm is >= 0.
      if (b_out) b_out[i] = static_cast<T>(b > 0.0 ? b : 0.0);
    }
  });
}

template void linear_sq_norms<float>(const View3<float>&, const View3<float>&, LinearMethod,
                                     float*, float*, int);
template void linear_sq_norms<double>(const View3<double>&, const View3<double>&, LinearMethod,
                                      double*, double*, int);

}  // namespace fastclip
