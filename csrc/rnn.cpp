#include "rnn.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "gemm_avx512.h"

namespace fastclip {

RnnCell parse_rnn_cell(const std::string& name) {
  if (name == "lstm") return RnnCell::LSTM;
  if (name == "gru") return RnnCell::GRU;
  if (name == "rnn_tanh") return RnnCell::RnnTanh;
  if (name == "rnn_relu") return RnnCell::RnnRelu;
  throw ArgumentError("cell must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '" + name + "'");
}

int64_t rnn_gates(RnnCell cell) {
  switch (cell) {
    case RnnCell::LSTM: return 4;
    case RnnCell::GRU: return 3;
    default: return 1;
  }
}

int64_t rnn_saved_width(RnnCell cell, int64_t h) {
  return cell == RnnCell::RnnTanh || cell == RnnCell::RnnRelu ? h : 4 * h;
}

namespace {

// exp(x) by range reduction x = k ln2 + r, |r| <= ln2/2, a Taylor polynomial for exp(r) and 2^k
// written into the exponent bits. Plain arithmetic and bit casts only, so the cell loops below
// vectorise (libm's exp does not); error ~1 ulp (degree 7 for float, 13 for double). Inputs are
// clamped to the finite range, so sigmoid/tanh saturate cleanly.
inline float exp_v(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float kf = x * 1.44269504088896341f + magic;
  const float k = kf - magic;
  int32_t ki;
  std::memcpy(&ki, &kf, 4);
  ki -= 0x4B400000;
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline double exp_v(double x) {
  x = std::min(std::max(x, -708.0), 709.0);
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double kf = x * 1.4426950408889634074 + magic;
  const double k = kf - magic;
  int64_t ki;
  std::memcpy(&ki, &kf, 8);
  ki -= 0x4338000000000000LL;
  const double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (ki + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, 8);
  return p * scale;
}

template <class T>
inline T sigmoid(T x) { return T(1) / (T(1) + exp_v(-x)); }
template <class T>
inline T tanh_(T x) { return T(1) - T(2) / (exp_v(T(2) * x) + T(1)); }

// The per-row cell updates: plain loops over the hidden units, compiled once per ISA (picked at
// load time; target_clones needs non-template functions, hence the overload pairs).
#define FASTCLIP_RNN_MV __attribute__((target_clones("avx512f", "avx2,fma", "default")))

// LSTM step for one row. g (4h): in = input projection, out = activations i, f, g, o.
template <class T>
inline __attribute__((always_inline)) void lstm_fwd_body(
    int64_t h, T* __restrict g, const T* __restrict q, const T* __restrict b, T* __restrict c,
    T* __restrict cp, T* __restrict tc, T* __restrict hs, T* __restrict out) {
  for (int64_t j = 0; j < h; ++j) {
    const T ig = sigmoid(g[j] + q[j] + b[j]);
    const T fg = sigmoid(g[h + j] + q[h + j] + b[h + j]);
    const T gg = tanh_(g[2 * h + j] + q[2 * h + j] + b[2 * h + j]);
    const T og = sigmoid(g[3 * h + j] + q[3 * h + j] + b[3 * h + j]);
    const T cj = c[j];
    const T cn = fg * cj + ig * gg;
    const T th = tanh_(cn);
    cp[j] = cj;
    c[j] = cn;
    tc[j] = th;
    g[j] = ig;
    g[h + j] = fg;
    g[2 * h + j] = gg;
    g[3 * h + j] = og;
    const T hn = og * th;
    hs[j] = hn;
    out[j] = hn;
  }
}
FASTCLIP_RNN_MV void lstm_fwd_row(int64_t h, float* g, const float* q, const float* b, float* c,
                                  float* cp, float* tc, float* hs, float* out) {
  lstm_fwd_body(h, g, q, b, c, cp, tc, hs, out);
}
FASTCLIP_RNN_MV void lstm_fwd_row(int64_t h, double* g, const double* q, const double* b,
                                  double* c, double* cp, double* tc, double* hs, double* out) {
  lstm_fwd_body(h, g, q, b, c, cp, tc, hs, out);
}

// LSTM backward for one row: gi (4h) = gate pre-activation gradients; dh (in: gradient from the
// later step) is consumed; dc is updated to the gradient w.r.t. c_{t-1}.
template <class T>
inline __attribute__((always_inline)) void lstm_bwd_body(
    int64_t h, const T* __restrict sv, const T* __restrict tc, const T* __restrict cp,
    const T* __restrict dout, const T* __restrict dh, T* __restrict dc, T* __restrict gi) {
  for (int64_t j = 0; j < h; ++j) {
    const T ig = sv[j], fg = sv[h + j], gg = sv[2 * h + j], og = sv[3 * h + j];
    const T dhj = dh[j] + dout[j], th = tc[j];
    const T dcj = dc[j] + dhj * og * (T(1) - th * th);
    gi[j] = dcj * gg * ig * (T(1) - ig);
    gi[h + j] = dcj * cp[j] * fg * (T(1) - fg);
    gi[2 * h + j] = dcj * ig * (T(1) - gg * gg);
    gi[3 * h + j] = dhj * th * og * (T(1) - og);
    dc[j] = dcj * fg;
  }
}
FASTCLIP_RNN_MV void lstm_bwd_row(int64_t h, const float* sv, const float* tc, const float* cp,
                                  const float* dout, const float* dh, float* dc, float* gi) {
  lstm_bwd_body(h, sv, tc, cp, dout, dh, dc, gi);
}
FASTCLIP_RNN_MV void lstm_bwd_row(int64_t h, const double* sv, const double* tc,
                                  const double* cp, const double* dout, const double* dh,
                                  double* dc, double* gi) {
  lstm_bwd_body(h, sv, tc, cp, dout, dh, dc, gi);
}

// C (m x n) = A (m x k, leading dim lda) times P (k x n, leading dim ldp): the per-step product
// of a slice's few rows with a recurrent weight. BLAS repacks the whole weight on every call,
// which costs as much as the product when m is a few dozen rows; here the weight is laid out once
// per call of the layer (P = W^T, or W itself in the backward) and a register-blocked kernel
// (RB rows x NB columns of accumulators) streams it directly. float32 on an AVX-512 CPU runs
// small_gemm (gemm_avx512.h) instead: its 6 x 64 register block is 1.1-1.3x faster here.
template <class T, int RB, int NB>
inline __attribute__((always_inline)) void step_gemm_body(int64_t m, int64_t n, int64_t k,
                                                          const T* __restrict A, int64_t lda,
                                                          const T* __restrict P, int64_t ldp,
                                                          T* __restrict C, int64_t ldc) {
  for (int64_t n0 = 0; n0 < n; n0 += NB) {
    const int64_t nb = std::min<int64_t>(NB, n - n0);
    for (int64_t r0 = 0; r0 < m; r0 += RB) {
      const int64_t rb = std::min<int64_t>(RB, m - r0);
      T acc[RB][NB] = {};
      const T* a = A + r0 * lda;
      if (rb == RB && nb == NB) {
        for (int64_t q = 0; q < k; ++q) {
          const T* w = P + q * ldp + n0;
          for (int rr = 0; rr < RB; ++rr) {
            const T av = a[rr * lda + q];
            for (int c = 0; c < NB; ++c) acc[rr][c] += av * w[c];
          }
        }
      } else {
        for (int64_t q = 0; q < k; ++q) {
          const T* w = P + q * ldp + n0;
          for (int rr = 0; rr < rb; ++rr) {
            const T av = a[rr * lda + q];
            for (int c = 0; c < nb; ++c) acc[rr][c] += av * w[c];
          }
        }
      }
      for (int rr = 0; rr < rb; ++rr)
        for (int c = 0; c < nb; ++c) C[(r0 + rr) * ldc + n0 + c] = acc[rr][c];
    }
  }
}
FASTCLIP_RNN_MV void step_gemm_portable(int64_t m, int64_t n, int64_t k, const float* A,
                                        int64_t lda, const float* P, int64_t ldp, float* C,
                                        int64_t ldc) {
  step_gemm_body<float, 4, 32>(m, n, k, A, lda, P, ldp, C, ldc);
}
void step_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* P,
               int64_t ldp, float* C, int64_t ldc) {
  if (small_gemm_available())
    small_gemm(m, n, k, A, lda, P, ldp, C, ldc);
  else
    step_gemm_portable(m, n, k, A, lda, P, ldp, C, ldc);
}
FASTCLIP_RNN_MV void step_gemm(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda,
                               const double* P, int64_t ldp, double* C, int64_t ldc) {
  step_gemm_body<double, 4, 16>(m, n, k, A, lda, P, ldp, C, ldc);
}

template <class T>
std::vector<T> transposed(const T* w, int64_t rows, int64_t cols) {
  std::vector<T> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = w[r * cols + c];
  return out;
}

// Whether rows_times runs small_gemm for T (float32 on an AVX-512 CPU), which reads the weights
// transposed; BLAS reads them as laid out. Each call builds only the layout its path reads.
template <class T>
bool transposed_weights() {
  if constexpr (std::is_same_v<T, float>) return small_gemm_available();
  return false;
}

// C (m x n, ldc) = A (m x k, lda) W^T for a weight W (n x k) also given transposed (Wt, k x n):
// small_gemm on Wt where it runs (transposed_weights<T>()), else BLAS on W. The LSTM bench layer's
// forward 14.8 -> 11.9 ms and backward 13.5 -> 11.0 ms at 2 threads (Zen 5, OpenBLAS pinned to
// Haswell kernels): the input projection, the step products and dx all run at the AVX-512 rate.
template <class T>
void rows_times(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* Wt, const T* W,
                T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (transposed_weights<T>()) {
      small_gemm(m, n, k, A, lda, Wt, n, C, ldc);
      return;
    }
  }
  blas::gemm_nt<T>(m, n, k, A, lda, W, k, C, ldc);
}

// The batch is split into at most num_threads contiguous slices; each runs the whole time loop
// (examples are independent), so threads never wait on each other between steps.
template <class Fn>
void over_slices(int64_t B, int num_threads, Fn&& fn) {
  const int64_t n = std::min<int64_t>(std::max(num_threads, 1), B);
  if (n <= 0) return;
  parallel_for(n, static_cast<int>(n), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = B * c / n, b1 = B * (c + 1) / n;
      if (b1 > b0) fn(b0, b1);
    }
  });
}

inline int64_t length_of(const int64_t* lengths, int64_t i, int64_t T_) {
  return lengths ? lengths[i] : T_;
}

// Time index of processing step s for an example of length L.
inline int64_t time_of(bool reverse, int64_t L, int64_t s) { return reverse ? L - 1 - s : s; }

template <class T>
void zero_rows(T* base, int64_t width, int64_t from, int64_t to) {
  if (base && to > from) std::memset(base + from * width, 0, sizeof(T) * (to - from) * width);
}

template <class T>
void forward_slice(const RnnForwardArgs<T>& a, const std::vector<T>& w_hh_t,
                   const std::vector<T>& w_ih_t, int64_t b0, int64_t b1) {
  const int64_t R = b1 - b0, h = a.h, T_ = a.T_, d = a.d;
  const int64_t Gh = rnn_gates(a.cell) * h, W = rnn_saved_width(a.cell, h);
  const bool lstm = a.cell == RnnCell::LSTM;
  std::vector<T> H(R * h, T(0)), C(lstm ? R * h : 0, T(0)), hw(R * Gh);
  std::vector<T> bias(Gh, T(0));  // b_ih + b_hh, added once per gate pre-activation
  for (int64_t k = 0; k < Gh; ++k) bias[k] = (a.b_ih ? a.b_ih[k] : T(0)) + (a.b_hh ? a.b_hh[k] : T(0));
  if (a.h0) std::memcpy(H.data(), a.h0 + b0 * h, sizeof(T) * R * h);
  if (lstm && a.c0) std::memcpy(C.data(), a.c0 + b0 * h, sizeof(T) * R * h);
  int64_t Tmax = 0;
  // Input projection of every step at once, into the first Gh columns of the saved rows (the
  // activations overwrite them step by step): one GEMM for the slice when its rows are evenly
  // spaced, else one per example.
  const bool one_gemm = !a.lengths && d > 0 && T_ > 0 && (R == 1 || a.x.s0 == T_ * a.x.s1);
  if (one_gemm)
    rows_times<T>(R * T_, Gh, d, a.x.row(b0, 0), a.x.s1, w_ih_t.data(), a.w_ih,
                  a.saved + b0 * T_ * W, W);
  for (int64_t i = b0; i < b1; ++i) {
    const int64_t L = length_of(a.lengths, i, T_);
    Tmax = std::max(Tmax, L);
    // Input projection of all of the example's steps in one GEMM, into the first Gh columns of the
    // saved rows (the activations overwrite them step by step).
    if (one_gemm) {
    } else if (L > 0 && d > 0) {
      rows_times<T>(L, Gh, d, a.x.row(i, 0), a.x.s1, w_ih_t.data(), a.w_ih,
                    a.saved + i * T_ * W, W);
    } else if (L > 0) {
      for (int64_t t = 0; t < L; ++t) std::fill_n(a.saved + (i * T_ + t) * W, Gh, T(0));
    }
    // Padded steps: zero outputs and zero factors, so they add nothing to any norm or gradient.
    zero_rows(a.out + i * T_ * h, h, L, T_);
    zero_rows(a.saved + i * T_ * W, W, L, T_);
    zero_rows(a.h_prev + i * T_ * h, h, L, T_);
    if (lstm) {
      zero_rows(a.c_prev + i * T_ * h, h, L, T_);
      zero_rows(a.tanh_c + i * T_ * h, h, L, T_);
    }
  }
  for (int64_t s = 0; s < Tmax; ++s) {
    rows_times<T>(R, Gh, h, H.data(), h, w_hh_t.data(), a.w_hh, hw.data(), Gh);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = b0 + r, L = length_of(a.lengths, i, T_);
      if (s >= L) continue;  // this example has ended: its state stays as it was
      const int64_t t = time_of(a.reverse, L, s), it = i * T_ + t;
      T* g = a.saved + it * W;
      const T* q = hw.data() + r * Gh;
      T* hr = H.data() + r * h;
      T* o = a.out + it * h;
      std::memcpy(a.h_prev + it * h, hr, sizeof(T) * h);
      const T* bi = a.b_ih;
      const T* bh = a.b_hh;
      switch (a.cell) {
        case RnnCell::LSTM:
          lstm_fwd_row(h, g, q, bias.data(), C.data() + r * h, a.c_prev + it * h,
                       a.tanh_c + it * h, hr, o);
          break;
        case RnnCell::GRU: {
          for (int64_t j = 0; j < h; ++j) {
            T xr = g[j], xz = g[h + j], xn = g[2 * h + j];
            T hr_ = q[j], hz = q[h + j], hn = q[2 * h + j];
            if (bi) xr += bi[j], xz += bi[h + j], xn += bi[2 * h + j];
            if (bh) hr_ += bh[j], hz += bh[h + j], hn += bh[2 * h + j];
            const T rg = sigmoid(xr + hr_), zg = sigmoid(xz + hz);
            const T ng = tanh_(xn + rg * hn);
            g[j] = rg;
            g[h + j] = zg;
            g[2 * h + j] = ng;
            g[3 * h + j] = hn;
            hr[j] = o[j] = (T(1) - zg) * ng + zg * hr[j];
          }
          break;
        }
        default: {
          const bool relu = a.cell == RnnCell::RnnRelu;
          for (int64_t j = 0; j < h; ++j) {
            T v = g[j] + q[j];
            if (bi) v += bi[j];
            if (bh) v += bh[j];
            v = relu ? (v > T(0) ? v : T(0)) : tanh_(v);
            g[j] = v;
            hr[j] = o[j] = v;
          }
        }
      }
    }
  }
  std::memcpy(a.h_n + b0 * h, H.data(), sizeof(T) * R * h);
  if (lstm && a.c_n) std::memcpy(a.c_n + b0 * h, C.data(), sizeof(T) * R * h);
}

template <class T>
void backward_slice(const RnnBackwardArgs<T>& a, const std::vector<T>& w_hh_t,
                    const std::vector<T>& w_ih_t, int64_t b0, int64_t b1) {
  const int64_t R = b1 - b0, h = a.h, T_ = a.T_, d = a.d;
  const int64_t Gh = rnn_gates(a.cell) * h, W = rnn_saved_width(a.cell, h);
  const bool lstm = a.cell == RnnCell::LSTM, gru = a.cell == RnnCell::GRU;
  const bool shared_t = a.lengths == nullptr;
  std::vector<T> dH(R * h, T(0)), dC(lstm ? R * h : 0, T(0)), gstep(R * Gh, T(0)), dhw(R * h);
  if (a.d_hn) std::memcpy(dH.data(), a.d_hn + b0 * h, sizeof(T) * R * h);
  if (lstm && a.d_cn) std::memcpy(dC.data(), a.d_cn + b0 * h, sizeof(T) * R * h);
  int64_t Tmax = 0;
  for (int64_t i = b0; i < b1; ++i) {
    const int64_t L = length_of(a.lengths, i, T_);
    Tmax = std::max(Tmax, L);
    zero_rows(a.g_ih + i * T_ * Gh, Gh, L, T_);
    if (gru) zero_rows(a.g_hh + i * T_ * Gh, Gh, L, T_);
    if (a.g_sum) std::fill_n(a.g_sum + i * Gh, Gh, T(0));
    if (a.g_hh_sum && gru) std::fill_n(a.g_hh_sum + i * Gh, Gh, T(0));
  }
  for (int64_t s = Tmax - 1; s >= 0; --s) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = b0 + r, L = length_of(a.lengths, i, T_);
      T* gs = gstep.data() + r * Gh;  // the row that multiplies W_hh this step
      if (s >= L) {
        std::fill_n(gs, Gh, T(0));
        continue;
      }
      const int64_t t = time_of(a.reverse, L, s), it = i * T_ + t;
      const T* sv = a.saved + it * W;
      const T* dout = a.d_out.row(i, t);
      T* dh = dH.data() + r * h;
      T* gi = a.g_ih + it * Gh;
      switch (a.cell) {
        case RnnCell::LSTM:
          lstm_bwd_row(h, sv, a.tanh_c + it * h, a.c_prev + it * h, dout, dh, dC.data() + r * h, gi);
          if (!shared_t) std::memcpy(gs, gi, sizeof(T) * Gh);
          break;
        case RnnCell::GRU: {
          const T* hp = a.h_prev + it * h;
          T* gh = a.g_hh + it * Gh;
          for (int64_t j = 0; j < h; ++j) {
            const T rg = sv[j], zg = sv[h + j], ng = sv[2 * h + j], hn = sv[3 * h + j];
            const T dhj = dh[j] + dout[j];
            const T dnp = dhj * (T(1) - zg) * (T(1) - ng * ng);
            const T drp = dnp * hn * rg * (T(1) - rg);
            const T dzp = dhj * (hp[j] - ng) * zg * (T(1) - zg);
            gi[j] = gh[j] = drp;
            gi[h + j] = gh[h + j] = dzp;
            gi[2 * h + j] = dnp;
            gh[2 * h + j] = dnp * rg;
            dh[j] = dhj * zg;  // the direct path h' = ... + z h; the W_hh path is added below
          }
          std::memcpy(gs, gh, sizeof(T) * Gh);
          break;
        }
        default: {
          const bool relu = a.cell == RnnCell::RnnRelu;
          for (int64_t j = 0; j < h; ++j) {
            const T v = sv[j], dhj = dh[j] + dout[j];
            gi[j] = relu ? (v > T(0) ? dhj : T(0)) : dhj * (T(1) - v * v);
          }
          if (!shared_t) std::memcpy(gs, gi, sizeof(T) * Gh);
        }
      }
      if (a.g_sum) {  // the bias gradients, while the row is in cache
        T* acc = a.g_sum + i * Gh;
        for (int64_t j = 0; j < Gh; ++j) acc[j] += gi[j];
      }
      if (a.g_hh_sum && gru) {
        T* acc = a.g_hh_sum + i * Gh;
        const T* gh = a.g_hh + it * Gh;
        for (int64_t j = 0; j < Gh; ++j) acc[j] += gh[j];
      }
    }
    // dh_{t-1} = G_t W_hh: one GEMM for the slice (W_hh^T is passed as the "B^T" operand). With
    // no lengths all rows are at the same t, so LSTM/RNN read G straight from g_ih (stride T Gh).
    if (shared_t && !gru)
      step_gemm(R, h, Gh, a.g_ih + (b0 * T_ + time_of(a.reverse, T_, s)) * Gh, T_ * Gh,
                a.w_hh, h, dhw.data(), h);
    else
      step_gemm(R, h, Gh, gstep.data(), Gh, a.w_hh, h, dhw.data(), h);
    for (int64_t r = 0; r < R; ++r) {
      if (s >= length_of(a.lengths, b0 + r, T_)) continue;  // passes its gradient through
      T* dh = dH.data() + r * h;
      const T* p = dhw.data() + r * h;
      if (gru)
        for (int64_t j = 0; j < h; ++j) dh[j] += p[j];
      else
        std::memcpy(dh, p, sizeof(T) * h);
    }
  }
  // Steps with no gradient left (T_ == 0, or every example shorter) keep dH as given.
  std::memcpy(a.d_h0 + b0 * h, dH.data(), sizeof(T) * R * h);
  if (lstm && a.d_c0) std::memcpy(a.d_c0 + b0 * h, dC.data(), sizeof(T) * R * h);
  if (a.d_x && d > 0 && T_ > 0)  // dx = G_ih W_ih for the slice's (R T_) rows at once
    rows_times<T>(R * T_, d, Gh, a.g_ih + b0 * T_ * Gh, Gh, a.w_ih, w_ih_t.data(),
                  a.d_x + b0 * T_ * d, d);
}


}  // namespace

template <class T>
void rnn_forward(const RnnForwardArgs<T>& a, int num_threads) {
  check(a.B >= 0 && a.T_ >= 0 && a.d >= 0 && a.h >= 1, "invalid RNN sizes");
  if (a.lengths)
    for (int64_t i = 0; i < a.B; ++i)
      check(a.lengths[i] >= 1 && a.lengths[i] <= a.T_,
            "lengths[" + std::to_string(i) + "] = " + std::to_string(a.lengths[i]) +
                " is outside [1, " + std::to_string(a.T_) + "]");
  if (a.B == 0) return;
  const int64_t Gh = rnn_gates(a.cell) * a.h;
  const bool t = transposed_weights<T>();
  const std::vector<T> w_hh_t = t ? transposed(a.w_hh, Gh, a.h) : std::vector<T>();
  const std::vector<T> w_ih_t = t ? transposed(a.w_ih, Gh, a.d) : std::vector<T>();
  over_slices(a.B, num_threads,
              [&](int64_t b0, int64_t b1) { forward_slice(a, w_hh_t, w_ih_t, b0, b1); });
}

template <class T>
void rnn_backward(const RnnBackwardArgs<T>& a, int num_threads) {
  check(a.B >= 0 && a.T_ >= 0 && a.d >= 0 && a.h >= 1, "invalid RNN sizes");
  if (a.lengths)
    for (int64_t i = 0; i < a.B; ++i)
      check(a.lengths[i] >= 1 && a.lengths[i] <= a.T_,
            "lengths[" + std::to_string(i) + "] = " + std::to_string(a.lengths[i]) +
                " is outside [1, " + std::to_string(a.T_) + "]");
  if (a.B == 0) return;
  const int64_t Gh = rnn_gates(a.cell) * a.h;
  const std::vector<T> w_hh_t;  // unused: step_gemm reads W_hh as laid out
  // dx = G_ih W_ih: small_gemm reads W_ih as laid out, BLAS its transpose.
  const std::vector<T> w_ih_t =
      a.d_x && !transposed_weights<T>() ? transposed(a.w_ih, Gh, a.d) : std::vector<T>();
  over_slices(a.B, num_threads,
              [&](int64_t b0, int64_t b1) { backward_slice(a, w_hh_t, w_ih_t, b0, b1); });
}

namespace {
// sum over the full symmetric matrices of P .* Q, from their upper triangles (incl. diagonal).
template <class T>
double sym_inner(const T* P, const T* Q, int64_t n) {
  double s = 0;
  for (int64_t r = 0; r < n; ++r) {
    s += double(P[r * n + r]) * double(Q[r * n + r]);
    if (r + 1 < n) s += 2 * dot(P + r * n + r + 1, Q + r * n + r + 1, n - r - 1);
  }
  return s;
}
}  // namespace

template <class T>
void rnn_ghost_sq_norms(const View3<T>& x, const View3<T>& h_prev, const View3<T>& g_ih,
                        const View3<T>* g_hh, T* w_ih_out, T* w_hh_out, int num_threads) {
  const int64_t B = g_ih.n0, T_ = g_ih.n1;
  check(x.n0 == B && h_prev.n0 == B && x.n1 == T_ && h_prev.n1 == T_ &&
            (!g_hh || (g_hh->n0 == B && g_hh->n1 == T_ && g_hh->n2 == g_ih.n2)),
        "inconsistent shapes of the recurrent factors");
  parallel_for(B, num_threads, [&](int64_t b0, int64_t b1) {
    std::vector<T> gg(T_ * T_), ga(T_ * T_);
    for (int64_t i = b0; i < b1; ++i) {
      if (T_ == 0) {
        w_ih_out[i] = w_hh_out[i] = T(0);
        continue;
      }
      blas::syrk_upper<T>(T_, g_ih.n2, g_ih.slab(i), g_ih.s1, gg.data(), T_);
      blas::syrk_upper<T>(T_, x.n2, x.slab(i), x.s1, ga.data(), T_);
      w_ih_out[i] = static_cast<T>(sym_inner(ga.data(), gg.data(), T_));
      if (g_hh) blas::syrk_upper<T>(T_, g_hh->n2, g_hh->slab(i), g_hh->s1, gg.data(), T_);
      blas::syrk_upper<T>(T_, h_prev.n2, h_prev.slab(i), h_prev.s1, ga.data(), T_);
      w_hh_out[i] = static_cast<T>(sym_inner(ga.data(), gg.data(), T_));
    }
  });
}

template void rnn_ghost_sq_norms<float>(const View3<float>&, const View3<float>&,
                                        const View3<float>&, const View3<float>*, float*, float*,
                                        int);
template void rnn_ghost_sq_norms<double>(const View3<double>&, const View3<double>&,
                                         const View3<double>&, const View3<double>*, double*,
                                         double*, int);
template void rnn_forward<float>(const RnnForwardArgs<float>&, int);
template void rnn_forward<double>(const RnnForwardArgs<double>&, int);
template void rnn_backward<float>(const RnnBackwardArgs<float>&, int);
template void rnn_backward<double>(const RnnBackwardArgs<double>&, int);

}  // namespace fastclip
