// Per-example squared norms of a linear layer's weight gradient grad_W_i = G_i^T A_i
// (A_i: T x d layer inputs, G_i: T x p gradients at the layer output), and optionally of its bias
// gradient sum_t g_t, without forming any per-example gradient wider than a bounded tile.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace fastclip {

enum class LinearMethod { Auto, Product, Ghost, Direct };

// "auto" | "product" | "ghost" | "direct"; throws ArgumentError with the offending string.
LinearMethod parse_linear_method(const std::string& name);
const char* linear_method_name(LinearMethod method);

// The cheapest exact method for shape (T, d, p): Product for T <= 1, else Ghost or Direct.
LinearMethod choose_linear_method(int64_t T, int64_t d, int64_t p);

// w_out[i] = ||G_i^T A_i||_F^2 and, if b_out != nullptr, b_out[i] = ||sum_t G_i[t]||^2, for the
// n0 examples of A (n0, T, d) and G (n0, T, p). Sums are accumulated in double. Auto resolves via
// choose_linear_method; Product requires T <= 1. Throws ArgumentError on inconsistent shapes.
template <class T>
void linear_sq_norms(const View3<T>& A, const View3<T>& G, LinearMethod method, T* w_out,
                     T* b_out, int num_threads);

}  // namespace fastclip
