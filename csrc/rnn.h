// One layer and direction of a recurrent network (LSTM, GRU, Elman RNN with tanh/relu), forward
// and backward through time, with everything the per-example gradient norms need kept in
// batch-major (B, T, .) buffers: the gate pre-activation gradients G and the previous hidden
// states h_{t-1}. The weight gradients are then grad_W_ih = sum_t G_t^T x_t and
// grad_W_hh = sum_t G_t^T h_{t-1}: linear-layer factors with the time steps as positions.
//
// Examples are independent, so each thread runs the whole time loop for its own slice of the batch
// (no synchronisation per step); per step it does one GEMM of its rows with W_hh.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace fastclip {

enum class RnnCell { LSTM, GRU, RnnTanh, RnnRelu };

// "lstm" | "gru" | "rnn_tanh" | "rnn_relu"; throws ArgumentError otherwise.
RnnCell parse_rnn_cell(const std::string& name);
// Gates per hidden unit: 4 (LSTM), 3 (GRU), 1 (RNN). Weights are (gates * h, .), torch's order.
int64_t rnn_gates(RnnCell cell);
// Width of the per-step saved activations: LSTM i,f,g,o (4h); GRU r,z,n and W_hn h + b_hn (4h);
// RNN h' (h).
int64_t rnn_saved_width(RnnCell cell, int64_t h);

template <class T>
struct RnnForwardArgs {
  RnnCell cell = RnnCell::LSTM;
  int64_t B = 0, T_ = 0, d = 0, h = 0;
  bool reverse = false;
  const int64_t* lengths = nullptr;  // (B,), each in [1, T_], or null: every example has T_ steps
  View3<T> x;                        // (B, T_, d)
  const T* w_ih = nullptr;           // (gates h, d) contiguous
  const T* w_hh = nullptr;           // (gates h, h) contiguous
  const T* b_ih = nullptr;           // (gates h) or null
  const T* b_hh = nullptr;
  const T* h0 = nullptr;  // (B, h) contiguous or null (zeros)
  const T* c0 = nullptr;  // (B, h) LSTM only, or null (zeros)
  // outputs, all contiguous
  T* out = nullptr;     // (B, T_, h); zero at padded steps t >= lengths[i]
  T* h_n = nullptr;     // (B, h): state after each example's last step
  T* c_n = nullptr;     // (B, h) LSTM
  T* saved = nullptr;   // (B, T_, rnn_saved_width)
  T* h_prev = nullptr;  // (B, T_, h): the state the step at time t started from (zero if padded)
  T* c_prev = nullptr;  // (B, T_, h) LSTM
  T* tanh_c = nullptr;  // (B, T_, h) LSTM: tanh(c_t)
};

template <class T>
void rnn_forward(const RnnForwardArgs<T>& a, int num_threads);

template <class T>
struct RnnBackwardArgs {
  RnnCell cell = RnnCell::LSTM;
  int64_t B = 0, T_ = 0, d = 0, h = 0;
  bool reverse = false;
  const int64_t* lengths = nullptr;
  View3<T> d_out;                // (B, T_, h) gradient at the outputs
  const T* d_hn = nullptr;       // (B, h) or null
  const T* d_cn = nullptr;       // (B, h) or null
  const T* w_ih = nullptr;       // (gates h, d)
  const T* w_hh = nullptr;       // (gates h, h)
  const T* saved = nullptr;      // from the forward
  const T* h_prev = nullptr;
  const T* c_prev = nullptr;
  const T* tanh_c = nullptr;
  // outputs, contiguous
  T* g_ih = nullptr;  // (B, T_, gates h): gradient at the input projection's pre-activations
  T* g_hh = nullptr;  // (B, T_, gates h): at W_hh h + b_hh (GRU only: differs in the n gate)
  T* d_x = nullptr;   // (B, T_, d) or null
  T* d_h0 = nullptr;  // (B, h)
  T* d_c0 = nullptr;  // (B, h) LSTM
  T* g_sum = nullptr;     // (B, gates h): sum over t of g_ih (the bias_ih gradient), or null
  T* g_hh_sum = nullptr;  // (B, gates h): sum over t of g_hh (GRU only), or null
};

template <class T>
void rnn_backward(const RnnBackwardArgs<T>& a, int num_threads);

// Per-example squared norms of both weight gradients of one layer/direction by the ghost identity
// ||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T>: the (T x T) Gram of G is formed once and serves
// weight_ih (A = x) and weight_hh (A = h_prev), so the pair costs T^2 (gates h + d + h) per example
// instead of T^2 (2 gates h + d + h). g_hh null means g_hh = g_ih (LSTM, RNN); GRU's differs and
// gets its own Gram. Sums accumulate in double.
template <class T>
void rnn_ghost_sq_norms(const View3<T>& x, const View3<T>& h_prev, const View3<T>& g_ih,
                        const View3<T>* g_hh, T* w_ih_out, T* w_hh_out, int num_threads);

}  // namespace fastclip
