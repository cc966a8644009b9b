// The direct method's per-example weight gradient of a float32 convolution, G_i U_i^T, formed by
// an AVX-512 kernel that reads the unfolded input U_i straight from a zero-padded copy of the
// example's input instead of building U_i (K x P) and handing it to BLAS.
//
// Why: on the conv layers where the direct method wins (many output positions, few channels)
// the product is a long reduction (P) into a small K x Og block. The unfold's K x P buffer is
// larger than L2 there (resnet's 32-channel layers: 1.2 MB per example) and BLAS runs the
// product at its AVX2 rate where OpenBLAS is pinned to Haswell kernels (OPENBLAS_CORETYPE), half
// the rate of torch's own weight-gradient convolution. The kernel keeps an Og-wide block of
// accumulators for a few rows of K in registers and streams P once per row block: U_i's element
// for row (channel, tap) at output position p is padded_x[base(p) + offset(row)].
#pragma once
#include <cstdint>
#include <vector>

#include "conv.h"

namespace fastclip {

// Whether conv_direct_fused runs here: an x86-64 build where isa_level() is AVX-512 (FASTCLIP_ISA
// caps it, common.h), and not turned off by set_conv_direct_fused.
bool conv_direct_fused_available();

// Turns the kernel on or off for the process (tests compare both paths); returns the old setting.
bool set_conv_direct_fused(bool enabled);

// Whether one example and group of this shape fits the kernel's buffers (the padded input and
// the transposed G, each at most kConvUnfoldBudget elements); the caller falls back otherwise.
bool conv_direct_fused_fits(const ConvShape& s, int64_t Og);

// C (K x Og, row-major) = U G^T for example xi (its channels c0 .. c0 + C/groups), G: Og x P with
// leading dimension ldg. Accumulates in float32 in a fixed order (the result does not depend on
// the thread count). xpad and gt are the caller's per-thread buffers. Only call when available
// and fits.
void conv_direct_fused(const ConvShape& s, const float* xi, int64_t c0, const float* G, int64_t ldg,
                       int64_t Og, std::vector<float>& xpad, std::vector<float>& gt, float* C);

}  // namespace fastclip
