#include "clip.h"

#include <algorithm>
#include <vector>

#include "common.h"

namespace fastclip {
namespace {

// Work item: elements [begin, end) of one part. Chunks are small enough for a row of every
// example to stay in L1/L2 while the k rows are read, large enough to amortise the dispatch.
constexpr int64_t kChunk = 1 << 14;

struct Item {
  int64_t part, begin, end;
};

std::vector<Item> items_of(const ClipPart* parts, int64_t n_parts) {
  std::vector<Item> items;
  for (int64_t p = 0; p < n_parts; ++p)
    for (int64_t b = 0; b < parts[p].n; b += kChunk)
      items.push_back({p, b, std::min(parts[p].n, b + kChunk)});
  return items;
}

#define FASTCLIP_MULTIVERSION __attribute__((target_clones("avx2,fma", "default")))

FASTCLIP_MULTIVERSION void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}
FASTCLIP_MULTIVERSION void axpy(double a, const double* x, double* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

template <class T>
void accumulate_item(const ClipPart& part, const Item& it, int64_t k, int64_t L,
                     const double* factors) {
  const T* g = static_cast<const T*>(part.grad);
  T* acc = static_cast<T*>(part.acc);
  for (int64_t i = 0; i < k; ++i) {
    const double f = factors[i * L + part.group];
    if (f == 0.0) continue;
    axpy(static_cast<T>(f), g + i * part.n + it.begin, acc + it.begin, it.end - it.begin);
  }
}

}  // namespace

void clip_sq_norms(const ClipPart* parts, int64_t n_parts, int64_t k, int64_t L, double* sq,
                   int num_threads) {
  std::fill(sq, sq + k * L, 0.0);
  if (k == 0) return;
  const std::vector<Item> items = items_of(parts, n_parts);
  std::vector<double> partial(items.size() * k);
  parallel_for(static_cast<int64_t>(items.size()), num_threads, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const Item& it = items[t];
      const ClipPart& part = parts[it.part];
      for (int64_t i = 0; i < k; ++i) {
        const int64_t off = i * part.n + it.begin, len = it.end - it.begin;
        partial[t * k + i] = part.f64 ? sum_sq(static_cast<const double*>(part.grad) + off, len)
                                      : sum_sq(static_cast<const float*>(part.grad) + off, len);
      }
    }
  });
  for (size_t t = 0; t < items.size(); ++t)
    for (int64_t i = 0; i < k; ++i) sq[i * L + parts[items[t].part].group] += partial[t * k + i];
}

void clip_accumulate(const ClipPart* parts, int64_t n_parts, int64_t k, int64_t L,
                     const double* factors, int num_threads) {
  if (k == 0) return;
  const std::vector<Item> items = items_of(parts, n_parts);
  parallel_for(static_cast<int64_t>(items.size()), num_threads, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const ClipPart& part = parts[items[t].part];
      if (part.acc == nullptr) continue;
      if (part.f64)
        accumulate_item<double>(part, items[t], k, L, factors);
      else
        accumulate_item<float>(part, items[t], k, L, factors);
    }
  });
}

}  // namespace fastclip
