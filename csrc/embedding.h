// Embedding layers: per-example squared norms of the weight gradient by the unique-token method,
// and the cross term of a weight tied between an embedding and an output projection.
//
// For example i with token ids x_t and output gradients g_t (t < T), the weight gradient is
// E_i[v] = sum_{t: x_t = v} g_t (rows at the example's tokens, zero elsewhere), so
// ||E_i||^2 = sum over distinct tokens v of ||sum_{t: x_t = v} g_t||^2. Grouping the T ids of an
// example by sorting costs T log T + T p; the ghost formula <[x_s == x_t], G G^T> would cost T^2 p.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastclip {

// A read-only (n0, n1) view of integer token ids (int32 or int64), element strides >= 0.
template <class I>
struct IdView {
  const I* data = nullptr;
  int64_t n0 = 0, n1 = 0;
  int64_t s0 = 0, s1 = 0;

  int64_t at(int64_t i, int64_t t) const { return static_cast<int64_t>(data[i * s0 + t * s1]); }
};

// Flat position (i * n1 + t) of the first id outside [0, num_embeddings), or -1 if all are valid.
template <class I>
int64_t find_bad_id(const IdView<I>& ids, int64_t num_embeddings);

// out[i] = sum_v ||sum_{t: ids[i,t] = v, v != padding_idx} G[i,t]||^2 for ids (n0, n1) and
// G (n0, n1, p). padding_idx < 0: no padding. Ids must be valid (find_bad_id). Accumulated in
// double; cost O(n0 n1 (p + log n1)), parallel over examples.
template <class T, class I>
void embedding_sq_norms(const IdView<I>& ids, const View3<T>& G, int64_t padding_idx, T* out,
                        int num_threads);

// Tied weight W (V x d) used by an embedding (ids (n0, Te), output gradients Gemb (n0, Te, d))
// and by an output projection y = h W^T (inputs H (n0, To, d), output gradients Gout (n0, To, V)):
// out[i] = <E_i, Gout_i^T H_i> = sum_{distinct v} sum_s Gout_i[s, v] (E_i[v] . h_s),
// without forming the V x d matrix: aggregate E_i over its U distinct tokens, one U x To GEMM
// with H_i, then a gather of Gout at the U tokens. Cost O(Te d + U To d) per example.
template <class T, class I>
void embedding_linear_cross(const IdView<I>& ids, const View3<T>& Gemb, const View3<T>& H,
                            const View3<T>& Gout, int64_t padding_idx, T* out, int num_threads);

}  // namespace fastclip
