// Per-example squared norms of a convolution's weight gradient (and bias gradient), from the layer
// input x and the gradient G at the layer output, for 1-D, 2-D and 3-D convolutions (1-D and 2-D
// are 3-D with size-1 dims). Per group, grad_W_i = G_i U_i^T with G_i: Og x P (P output
// positions) and U_i: K x P the unfolded input (K = C_in/groups * prod(kernel)). U_i is built one
// example (and group) at a time in a thread-local buffer; the B x K x P unfold is never formed.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace fastclip {

enum class ConvMethod { Auto, Ghost, Direct };

// Ghost tiles are kConvTile x kConvTile blocks of the two P x P Gram matrices U^T U and G^T G, so
// the Gram buffers are 2 kConvTile^2 elements whatever P is.
constexpr int64_t kConvTile = 256;
// At most this many elements of one example's unfolded input are held per thread (16 MiB of
// float32). Bigger unfolds are built a position chunk (direct) or a tile (ghost) at a time.
// The binding (src/bind_conv.cpp) sizes its scratch and overflow checks from the same two.
constexpr int64_t kConvUnfoldBudget = int64_t(1) << 22;
// The unfold takes output lines this many at a time (a 32-byte segment per line and tap).
constexpr int64_t kConvUnfoldLines = 1024;
// Ghost of a stride-1 conv with one tile of positions forms the Gram matrix of the padded input
// (Pin x Pin) instead of the unfold's, when Pin <= this (a 1 MiB float32 buffer) and cheaper.
constexpr int64_t kConvGramMax = 2 * kConvTile;

// "auto" | "ghost" | "direct"; throws ArgumentError with the offending string.
ConvMethod parse_conv_method(const std::string& name);
const char* conv_method_name(ConvMethod method);

// Everything the kernel needs besides the data pointers. Spatial arrays are (D, H, W); unused
// leading dims of a 1-D/2-D conv have size 1, kernel 1, stride 1, padding 0, dilation 1.
struct ConvShape {
  int64_t B = 0, C = 0, O = 0, groups = 1;
  int64_t in[3] = {1, 1, 1};      // input spatial size (as stored, before zero padding)
  int64_t out[3] = {1, 1, 1};     // output spatial size (G's)
  int64_t k[3] = {1, 1, 1};       // kernel size
  int64_t stride[3] = {1, 1, 1};
  int64_t pad_lo[3] = {0, 0, 0};  // zero padding before each dim
  int64_t pad_hi[3] = {0, 0, 0};  // zero padding after each dim (only checked against out)
  int64_t dil[3] = {1, 1, 1};
  // Element strides of x (B, C, D, H, W): any non-negative values (x is gathered elementwise).
  int64_t xs[5] = {0, 0, 0, 0, 0};
  // Element strides of G along B and O; each (example, channel) row of P positions is contiguous,
  // which is what lets BLAS take G_i as an Og x P matrix with leading dimension gs1.
  int64_t gs0 = 0, gs1 = 0;

  int64_t positions() const { return out[0] * out[1] * out[2]; }
  int64_t cols() const { return (C / groups) * k[0] * k[1] * k[2]; }  // K
};

// Throws ArgumentError (with the values) unless the shape is self-consistent: sizes >= 0,
// kernel/stride/dilation >= 1, padding >= 0, C and O divisible by groups, and out equal to
// floor((in + lo + hi - dil (k - 1) - 1) / stride) + 1 in every dim.
void check_conv_shape(const ConvShape& s);

// The cheapest exact method for one group of one example: Ghost ~ P^2 (K + Og) flops (memory
// 2 tile^2), Direct ~ 2 P K Og (memory Og K). Direct is refused when Og K is too big to hold.
ConvMethod choose_conv_method(int64_t P, int64_t K, int64_t Og);

// w_out[i] = sum over groups ||G_i U_i^T||_F^2, and if b_out != nullptr b_out[i] = ||sum_p G_i[:, p]||^2.
// Sums accumulate in double. Parallel over (example, group) pairs on up to num_threads threads.
// pe_out (Direct only, else nullptr): also keep the per-example gradients the direct method forms
// anyway, (B, groups, K, Og) row-major (per example and group the K x Og transpose of the
// weight's rows), so the clipped sum is then one (B,) x (B, O K) product instead of a second
// weight-gradient convolution.
// gb_out (needs b_out, else nullptr): also keep the per-example bias gradients sum_p G_i[:, p],
// (B, O) row-major, which the bias norm forms anyway (its clipped sum is then c @ gb_out).
template <class T>
void conv_sq_norms(const ConvShape& s, const T* x, const T* g, ConvMethod method, T* w_out,
                   T* b_out, int num_threads, T* pe_out = nullptr, T* gb_out = nullptr);

}  // namespace fastclip
