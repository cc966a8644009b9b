// Per-example gradients of the affine parameters of normalisation layers (LayerNorm, RMSNorm,
// GroupNorm, InstanceNorm). The parameters have only N or C entries, so the per-example gradients
// themselves (B x N) are cheap to hold: one fused pass per example reads x and the output gradient
// g once (a group's x twice, the second time from cache), recomputes the normalised input x_hat
// with the layer's own statistics, and writes
//   gw[i, k] = sum over positions of g * x_hat,   gb[i, k] = sum over positions of g.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastclip {

// "Last-dims affine" (LayerNorm, RMSNorm): x, g (B, T, N); statistics over the N entries of each
// row, weight indexed by N. LayerNorm: x_hat = (x - mean) / sqrt(var + eps) with the biased
// variance; RMSNorm (rms = true): x_hat = x / sqrt(mean(x^2) + eps). Statistics and sums in double.
// gw, gb: (B, N) row-major outputs; gb may be nullptr. Throws ArgumentError on inconsistent shapes.
template <class T>
void last_dims_affine_grads(const View3<T>& x, const View3<T>& g, bool rms, double eps, T* gw,
                            T* gb, int num_threads);

// "Channel affine" (GroupNorm, InstanceNorm): x, g (B, C, S); statistics over each group of
// C / groups channels x S positions, weight indexed by C. If mean and var (C entries each) are
// given, channel c is normalised with them instead: x_hat = (x - mean[c]) / sqrt(var[c] + eps)
// (InstanceNorm in eval mode with running statistics; needs groups == C).
// gw, gb: (B, C) row-major outputs; gb may be nullptr.
template <class T>
void channel_affine_grads(const View3<T>& x, const View3<T>& g, int64_t groups, double eps,
                          const double* mean, const double* var, T* gw, T* gb, int num_threads);

}  // namespace fastclip
