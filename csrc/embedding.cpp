#include "embedding.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "blas.h"

namespace fastclip {
namespace {

// Below this many elements of G read for the whole call, waking the pool costs more than it saves.
constexpr double kSerialWork = 1 << 16;
// The U x To product of the cross term is formed kCrossTile columns (output positions) at a time,
// so its buffer is bounded by U * kCrossTile whatever To is.
constexpr int64_t kCrossTile = 256;

int threads_for(double work, int num_threads) { return work < kSerialWork ? 1 : num_threads; }

// The positions of example i's non-padding ids, sorted by id (ties by position): equal ids form
// runs. Thread-local buffer, T log T.
template <class I>
void sorted_tokens(const IdView<I>& ids, int64_t i, int64_t padding_idx,
                   std::vector<std::pair<int64_t, int64_t>>& order) {
  order.clear();
  for (int64_t t = 0; t < ids.n1; ++t) {
    const int64_t v = ids.at(i, t);
    if (v != padding_idx) order.emplace_back(v, t);
  }
  std::sort(order.begin(), order.end());
}

// acc (double, p) = sum of the rows G[i, t] for the run order[b..e).
template <class T>
void sum_rows(const View3<T>& G, int64_t i, const std::pair<int64_t, int64_t>* run, int64_t len,
              double* acc) {
  const int64_t p = G.n2;
  const T* r0 = G.row(i, run[0].second);
  for (int64_t k = 0; k < p; ++k) acc[k] = static_cast<double>(r0[k]);
  for (int64_t j = 1; j < len; ++j) {
    const T* r = G.row(i, run[j].second);
    for (int64_t k = 0; k < p; ++k) acc[k] += static_cast<double>(r[k]);
  }
}

}  // namespace

template <class I>
int64_t find_bad_id(const IdView<I>& ids, int64_t num_embeddings) {
  for (int64_t i = 0; i < ids.n0; ++i)
    for (int64_t t = 0; t < ids.n1; ++t) {
      const int64_t v = ids.at(i, t);
      if (v < 0 || v >= num_embeddings) return i * ids.n1 + t;
    }
  return -1;
}

template <class T, class I>
void embedding_sq_norms(const IdView<I>& ids, const View3<T>& G, int64_t padding_idx, T* out,
                        int num_threads) {
  check(ids.n0 == G.n0 && ids.n1 == G.n1, "ids and gradients shapes differ");
  const int64_t B = G.n0, n = G.n1, p = G.n2;
  if (B == 0) return;
  if (n == 0 || p == 0) {
    std::fill(out, out + B, T(0));
    return;
  }
  const int threads = threads_for(double(B) * n * p, num_threads);
  parallel_for(B, threads, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, int64_t>> order;
    order.reserve(n);
    std::vector<double> acc(p);
    for (int64_t i = begin; i < end; ++i) {
      sorted_tokens(ids, i, padding_idx, order);
      const int64_t m = static_cast<int64_t>(order.size());
      double s = 0.0;
      for (int64_t b = 0; b < m;) {
        int64_t e = b + 1;
        while (e < m && order[e].first == order[b].first) ++e;
        if (e - b == 1) {
          s += sum_sq(G.row(i, order[b].second), p);  // a token seen once: its row as it is
        } else {
          sum_rows(G, i, order.data() + b, e - b, acc.data());
          s += dot(acc.data(), acc.data(), p);
        }
        b = e;
      }
      out[i] = static_cast<T>(s);
    }
  });
}

template <class T, class I>
void embedding_linear_cross(const IdView<I>& ids, const View3<T>& Gemb, const View3<T>& H,
                            const View3<T>& Gout, int64_t padding_idx, T* out, int num_threads) {
  check(ids.n0 == Gemb.n0 && ids.n1 == Gemb.n1, "ids and embedding gradients shapes differ");
  check(H.n0 == Gemb.n0 && Gout.n0 == Gemb.n0 && H.n1 == Gout.n1 && H.n2 == Gemb.n2,
        "cross-term operands have inconsistent shapes");
  const int64_t B = Gemb.n0, te = Gemb.n1, d = Gemb.n2, to = H.n1;
  if (B == 0) return;
  if (te == 0 || to == 0 || d == 0 || Gout.n2 == 0) {
    std::fill(out, out + B, T(0));
    return;
  }
  // BLAS wants a leading dimension >= the row length even for a single row (stride 0 there).
  const int64_t ldh = H.n1 <= 1 ? d : H.s1;
  const int threads = threads_for(double(B) * (te + to) * d, num_threads);
  parallel_for(B, threads, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, int64_t>> order;
    order.reserve(te);
    std::vector<double> acc(d);
    std::vector<T> E;            // U x d: the example's embedding gradient at its distinct tokens
    std::vector<int64_t> vocab;  // U: those tokens
    std::vector<T> M;            // U x kCrossTile block of E H^T
    for (int64_t i = begin; i < end; ++i) {
      sorted_tokens(ids, i, padding_idx, order);
      const int64_t m = static_cast<int64_t>(order.size());
      E.resize(m * d);
      vocab.clear();
      for (int64_t b = 0; b < m;) {
        int64_t e = b + 1;
        while (e < m && order[e].first == order[b].first) ++e;
        T* row = E.data() + static_cast<int64_t>(vocab.size()) * d;
        sum_rows(Gemb, i, order.data() + b, e - b, acc.data());
        for (int64_t k = 0; k < d; ++k) row[k] = static_cast<T>(acc[k]);
        vocab.push_back(order[b].first);
        b = e;
      }
      const int64_t U = static_cast<int64_t>(vocab.size());
      double s = 0.0;
      if (U > 0) {
        const int64_t cols = std::min(kCrossTile, to);
        M.resize(U * cols);
        const T* h = H.slab(i);
        for (int64_t s0 = 0; s0 < to; s0 += cols) {
          const int64_t nc = std::min(cols, to - s0);
          blas::gemm_nt(U, nc, d, E.data(), d, h + s0 * H.s1, ldh, M.data(), cols);
          for (int64_t c = 0; c < nc; ++c) {
            const T* go = Gout.row(i, s0 + c);
            double part = 0.0;
            for (int64_t u = 0; u < U; ++u)
              part += static_cast<double>(M[u * cols + c]) * static_cast<double>(go[vocab[u]]);
            s += part;
          }
        }
      }
      out[i] = static_cast<T>(s);
    }
  });
}

#define FASTCLIP_EMBEDDING_INSTANTIATE(T, I)                                                     \
  template void embedding_sq_norms<T, I>(const IdView<I>&, const View3<T>&, int64_t, T*, int);   \
  template void embedding_linear_cross<T, I>(const IdView<I>&, const View3<T>&, const View3<T>&, \
                                             const View3<T>&, int64_t, T*, int);

FASTCLIP_EMBEDDING_INSTANTIATE(float, int32_t)
FASTCLIP_EMBEDDING_INSTANTIATE(float, int64_t)
FASTCLIP_EMBEDDING_INSTANTIATE(double, int32_t)
FASTCLIP_EMBEDDING_INSTANTIATE(double, int64_t)
#undef FASTCLIP_EMBEDDING_INSTANTIATE

template int64_t find_bad_id<int32_t>(const IdView<int32_t>&, int64_t);
template int64_t find_bad_id<int64_t>(const IdView<int64_t>&, int64_t);

}  // namespace fastclip
