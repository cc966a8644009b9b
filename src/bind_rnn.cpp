// Bindings of the recurrent-layer kernels (csrc/rnn.h): one layer and direction of an LSTM, GRU or
// Elman RNN, forward and backward through time. Outputs are allocated here and returned.
#include <vector>

#include "binding.h"
#include "scratch.h"

#include "../csrc/rnn.h"

namespace fastclip_py {
namespace {

using fastclip::RnnCell;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t k = 0; k < v.size(); ++k) s += (k ? ", " : "") + std::to_string(v[k]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// A C-contiguous array of exactly `shape` with x's dtype, or None when `optional`.
py::object exact(const py::object& obj, const std::string& name, const py::array& like,
                 const std::vector<int64_t>& shape, bool optional) {
  if (obj.is_none()) {
    if (optional) return obj;
    throw py::type_error(name + " must be a numpy.ndarray, got None");
  }
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be a numpy.ndarray, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(like.dtype()) && !py::detail::npy_api::get().PyArray_EquivTypes_(
                                         a.dtype().ptr(), like.dtype().ptr()))
    throw py::type_error(name + " dtype " + dtype_name(a) + " differs from the input's " +
                         dtype_name(like));
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t k = 0; ok && k < shape.size(); ++k) ok = a.shape(k) == shape[k];
  if (!ok)
    throw py::value_error(name + " must have shape " + shape_str(shape) + ", got " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(name + " must be C-contiguous");
  return a;
}

template <class T>
const T* ptr(const py::object& a) {
  return a.is_none() ? nullptr : static_cast<const T*>(py::reinterpret_borrow<py::array>(a).data());
}

std::vector<int64_t> lengths_of(const py::object& obj, int64_t B, int64_t T_) {
  std::vector<int64_t> out;
  if (obj.is_none()) return out;
  auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!a || a.ndim() != 1 || a.shape(0) != B)
    throw py::value_error("lengths must be a 1-D integer array of " + std::to_string(B) +
                          " entries (one per example)");
  out.assign(a.data(), a.data() + B);
  for (int64_t i = 0; i < B; ++i)
    if (out[i] < 1 || out[i] > T_)
      throw py::value_error("lengths[" + std::to_string(i) + "] = " + std::to_string(out[i]) +
                            " is outside [1, " + std::to_string(T_) + "] (T = padded length)");
  return out;
}

struct Sizes {
  RnnCell cell;
  int64_t B, T_, d, h, Gh, W;
};

Sizes sizes_of(const std::string& cell_name, const py::array& x, const py::object& w_ih_obj,
               const py::object& w_hh_obj) {
  Sizes s{};
  s.cell = fastclip::parse_rnn_cell(cell_name);
  if (!py::isinstance<py::array>(w_hh_obj))
    throw py::type_error("w_hh must be a numpy.ndarray, got " + type_name(w_hh_obj));
  auto w_hh = py::reinterpret_borrow<py::array>(w_hh_obj);
  if (w_hh.ndim() != 2)
    throw py::value_error("w_hh must be 2-D (gates * hidden, hidden), got " + shape_str(w_hh));
  s.h = w_hh.shape(1);
  s.Gh = fastclip::rnn_gates(s.cell) * s.h;
  if (s.h < 1 || w_hh.shape(0) != s.Gh)
    throw py::value_error("w_hh " + shape_str(w_hh) + " is not (" +
                          std::to_string(fastclip::rnn_gates(s.cell)) + " * hidden, hidden) for " +
                          cell_name);
  s.B = x.shape(0);
  s.T_ = x.ndim() == 3 ? x.shape(1) : 1;
  s.d = x.shape(x.ndim() - 1);
  s.W = fastclip::rnn_saved_width(s.cell, s.h);
  exact(w_ih_obj, "w_ih", x, {s.Gh, s.d}, false);
  exact(w_hh_obj, "w_hh", x, {s.Gh, s.h}, false);
  return s;
}

// The (B, T, width) arrays the forward/backward allocate, and their time loop: sizes come from the
// input's declared shape (a zero-stride view has no memory behind it), so they are checked here.
void check_outputs(const Sizes& s, py::ssize_t item) {
  const int64_t w = std::max({s.W, s.Gh, s.h, s.d});
  check_elements(checked_prod({s.B, s.T_, w}, "recurrent buffers B x T x width"),
                 "a recurrent buffer (" + std::to_string(s.B) + " x " + std::to_string(s.T_) + " x " +
                     std::to_string(w) + ")");
  check_flops(double(s.B) * double(s.T_) * double(s.Gh) * (double(s.d) + double(s.h)) * 4.0,
              "this recurrent layer");
  (void)item;
}

template <class T>
py::tuple forward_impl(const Sizes& s, const py::array& x, const py::object& w_ih,
                       const py::object& w_hh, const py::object& b_ih, const py::object& b_hh,
                       const py::object& h0, const py::object& c0,
                       const std::vector<int64_t>& lengths, bool reverse, int threads) {
  const bool lstm = s.cell == RnnCell::LSTM;
  py::array_t<T> out({s.B, s.T_, s.h}), h_n({s.B, s.h}), saved({s.B, s.T_, s.W}),
      h_prev({s.B, s.T_, s.h});
  py::object c_n = py::none(), c_prev = py::none(), tanh_c = py::none();
  fastclip::RnnForwardArgs<T> a;
  a.cell = s.cell, a.B = s.B, a.T_ = s.T_, a.d = s.d, a.h = s.h, a.reverse = reverse;
  a.lengths = lengths.empty() ? nullptr : lengths.data();
  a.x = view_of<T>(x);
  a.w_ih = ptr<T>(w_ih), a.w_hh = ptr<T>(w_hh), a.b_ih = ptr<T>(b_ih), a.b_hh = ptr<T>(b_hh);
  a.h0 = ptr<T>(h0), a.c0 = ptr<T>(c0);
  a.out = out.mutable_data(), a.h_n = h_n.mutable_data(), a.saved = saved.mutable_data();
  a.h_prev = h_prev.mutable_data();
  if (lstm) {
    py::array_t<T> cn({s.B, s.h}), cp({s.B, s.T_, s.h}), tc({s.B, s.T_, s.h});
    a.c_n = cn.mutable_data(), a.c_prev = cp.mutable_data(), a.tanh_c = tc.mutable_data();
    c_n = cn, c_prev = cp, tanh_c = tc;
  }
  {
    // The core's buffers over all batch slices: state, cell state and gate rows per example.
    const ScratchUse use(0, 1, s.B * (2 * s.h + s.Gh) * int64_t(sizeof(T)));
    py::gil_scoped_release release;
    fastclip::rnn_forward<T>(a, threads);
  }
  return py::make_tuple(out, h_n, c_n, saved, h_prev, c_prev, tanh_c);
}

py::tuple rnn_forward(const std::string& cell, const py::object& x_obj, const py::object& w_ih,
                      const py::object& w_hh, const py::object& b_ih, const py::object& b_hh,
                      const py::object& h0, const py::object& c0, const py::object& lengths_obj,
                      bool reverse, int num_threads) {
  const py::array x = checked_array(x_obj, "input");
  if (x.ndim() != 3) throw py::value_error("input must be 3-D (B, T, d), got " + shape_str(x));
  const Sizes s = sizes_of(cell, x, w_ih, w_hh);
  exact(b_ih, "b_ih", x, {s.Gh}, true);
  exact(b_hh, "b_hh", x, {s.Gh}, true);
  exact(h0, "h0", x, {s.B, s.h}, true);
  if (s.cell == RnnCell::LSTM)
    exact(c0, "c0", x, {s.B, s.h}, true);
  else if (!c0.is_none())
    throw py::value_error("c0 is for LSTM only, got one for " + cell);
  const auto lengths = lengths_of(lengths_obj, s.B, s.T_);
  check_outputs(s, x.dtype().itemsize());
  const int threads = checked_threads(num_threads);
  if (x.dtype().itemsize() == 4)
    return forward_impl<float>(s, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, threads);
  return forward_impl<double>(s, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, threads);
}

template <class T>
py::tuple backward_impl(const Sizes& s, const py::array& d_out, const py::object& d_hn,
                        const py::object& d_cn, const py::object& w_ih, const py::object& w_hh,
                        const py::object& saved, const py::object& h_prev,
                        const py::object& c_prev, const py::object& tanh_c,
                        const std::vector<int64_t>& lengths, bool reverse, bool need_dx,
                        int threads) {
  const bool lstm = s.cell == RnnCell::LSTM, gru = s.cell == RnnCell::GRU;
  py::array_t<T> g_ih({s.B, s.T_, s.Gh}), d_h0({s.B, s.h}), g_sum({s.B, s.Gh});
  py::object g_hh = py::none(), d_x = py::none(), d_c0 = py::none(), g_hh_sum = py::none();
  fastclip::RnnBackwardArgs<T> a;
  a.cell = s.cell, a.B = s.B, a.T_ = s.T_, a.d = s.d, a.h = s.h, a.reverse = reverse;
  a.lengths = lengths.empty() ? nullptr : lengths.data();
  a.d_out = view_of<T>(d_out);
  a.d_hn = ptr<T>(d_hn), a.d_cn = ptr<T>(d_cn);
  a.w_ih = ptr<T>(w_ih), a.w_hh = ptr<T>(w_hh);
  a.saved = ptr<T>(saved), a.h_prev = ptr<T>(h_prev), a.c_prev = ptr<T>(c_prev),
  a.tanh_c = ptr<T>(tanh_c);
  a.g_ih = g_ih.mutable_data(), a.d_h0 = d_h0.mutable_data(), a.g_sum = g_sum.mutable_data();
  if (gru) {
    py::array_t<T> gh({s.B, s.T_, s.Gh}), ghs({s.B, s.Gh});
    a.g_hh = gh.mutable_data();
    a.g_hh_sum = ghs.mutable_data();
    g_hh = gh;
    g_hh_sum = ghs;
  }
  if (need_dx) {
    py::array_t<T> dx({s.B, s.T_, s.d});
    a.d_x = dx.mutable_data();
    d_x = dx;
  }
  if (lstm) {
    py::array_t<T> dc({s.B, s.h});
    a.d_c0 = dc.mutable_data();
    d_c0 = dc;
  }
  {
    // Over all batch slices: three state rows and the gate rows per example; W_ih transposed.
    const ScratchUse use(0, 1, (s.B * (3 * s.h + s.Gh) + (a.d_x ? s.Gh * s.d : 0)) * int64_t(sizeof(T)));
    py::gil_scoped_release release;
    fastclip::rnn_backward<T>(a, threads);
  }
  return py::make_tuple(g_ih, g_hh, d_x, d_h0, d_c0, g_sum, g_hh_sum);
}

py::tuple rnn_backward(const std::string& cell, const py::object& d_out_obj,
                       const py::object& d_hn, const py::object& d_cn, const py::object& w_ih,
                       const py::object& w_hh, const py::object& saved, const py::object& h_prev,
                       const py::object& c_prev, const py::object& tanh_c,
                       const py::object& lengths_obj, bool reverse, bool need_dx,
                       int num_threads) {
  const py::array d_out = checked_array(d_out_obj, "grad_output");
  if (d_out.ndim() != 3)
    throw py::value_error("grad_output must be 3-D (B, T, h), got " + shape_str(d_out));
  // Sizes come from the weights; the input width d is W_ih's second dim.
  if (!py::isinstance<py::array>(w_ih))
    throw py::type_error("w_ih must be a numpy.ndarray, got " + type_name(w_ih));
  auto wi = py::reinterpret_borrow<py::array>(w_ih);
  if (wi.ndim() != 2) throw py::value_error("w_ih must be 2-D, got " + shape_str(wi));
  Sizes s{};
  s.cell = fastclip::parse_rnn_cell(cell);
  s.B = d_out.shape(0), s.T_ = d_out.shape(1), s.d = wi.shape(1);
  if (!py::isinstance<py::array>(w_hh))
    throw py::type_error("w_hh must be a numpy.ndarray, got " + type_name(w_hh));
  auto wh = py::reinterpret_borrow<py::array>(w_hh);
  if (wh.ndim() != 2) throw py::value_error("w_hh must be 2-D, got " + shape_str(wh));
  s.h = wh.shape(1);
  s.Gh = fastclip::rnn_gates(s.cell) * s.h;
  s.W = fastclip::rnn_saved_width(s.cell, s.h);
  if (d_out.shape(2) != s.h)
    throw py::value_error("grad_output has " + std::to_string(d_out.shape(2)) +
                          " features, the hidden size is " + std::to_string(s.h));
  exact(w_ih, "w_ih", d_out, {s.Gh, s.d}, false);
  exact(w_hh, "w_hh", d_out, {s.Gh, s.h}, false);
  exact(d_hn, "grad_h_n", d_out, {s.B, s.h}, true);
  exact(saved, "saved", d_out, {s.B, s.T_, s.W}, false);
  exact(h_prev, "h_prev", d_out, {s.B, s.T_, s.h}, false);
  const bool lstm = s.cell == RnnCell::LSTM;
  exact(d_cn, "grad_c_n", d_out, {s.B, s.h}, true);
  exact(c_prev, "c_prev", d_out, {s.B, s.T_, s.h}, !lstm);
  exact(tanh_c, "tanh_c", d_out, {s.B, s.T_, s.h}, !lstm);
  const auto lengths = lengths_of(lengths_obj, s.B, s.T_);
  check_outputs(s, d_out.dtype().itemsize());
  const int threads = checked_threads(num_threads);
  if (d_out.dtype().itemsize() == 4)
    return backward_impl<float>(s, d_out, d_hn, d_cn, w_ih, w_hh, saved, h_prev, c_prev, tanh_c,
                                lengths, reverse, need_dx, threads);
  return backward_impl<double>(s, d_out, d_hn, d_cn, w_ih, w_hh, saved, h_prev, c_prev, tanh_c,
                               lengths, reverse, need_dx, threads);
}

template <class T>
py::tuple ghost_impl(const py::array& x, const py::array& hp, const py::array& gi,
                     const py::object& gh, int threads) {
  const View3<T> xv = view_of<T>(x), hv = view_of<T>(hp), gv = view_of<T>(gi);
  View3<T> hh;
  if (!gh.is_none()) hh = view_of<T>(py::reinterpret_borrow<py::array>(gh));
  py::array_t<T> w_ih(xv.n0), w_hh(xv.n0);
  T* pi = w_ih.mutable_data();
  T* ph = w_hh.mutable_data();
  {
    // Per thread two T x T Gram matrices.
    const ScratchUse use(2 * xv.n1 * xv.n1 * int64_t(sizeof(T)), std::min<int64_t>(threads, xv.n0));
    py::gil_scoped_release release;
    fastclip::rnn_ghost_sq_norms<T>(xv, hv, gv, gh.is_none() ? nullptr : &hh, pi, ph, threads);
  }
  return py::make_tuple(w_ih, w_hh);
}

py::tuple rnn_ghost_sq_norms(const py::object& x_obj, const py::object& hp_obj,
                             const py::object& gi_obj, const py::object& gh_obj, int num_threads) {
  const py::array x = checked_array(x_obj, "inputs");
  const py::array hp = checked_array(hp_obj, "h_prev");
  const py::array gi = checked_array(gi_obj, "g_ih");
  py::object gh = py::none();
  if (!gh_obj.is_none()) gh = checked_array(gh_obj, "g_hh");
  std::vector<std::pair<std::string, py::array>> all = {{"inputs", x}, {"h_prev", hp}, {"g_ih", gi}};
  if (!gh.is_none()) all.emplace_back("g_hh", py::reinterpret_borrow<py::array>(gh));
  for (auto& [name, a] : all) {
    if (a.ndim() != 3) throw py::value_error(name + " must be 3-D (B, T, n), got " + shape_str(a));
    if (a.dtype().itemsize() != x.dtype().itemsize())
      throw py::type_error(name + " dtype " + dtype_name(a) + " differs from the inputs' " +
                           dtype_name(x));
    if (a.shape(0) != x.shape(0) || a.shape(1) != x.shape(1))
      throw py::value_error(name + " " + shape_str(a) + " does not match inputs " + shape_str(x) +
                            " in (B, T)");
  }
  if (!gh.is_none() && py::reinterpret_borrow<py::array>(gh).shape(2) != gi.shape(2))
    throw py::value_error("g_hh and g_ih widths differ");
  // Per thread two T x T Gram matrices.
  const int64_t Tn = x.shape(1);
  check_scratch(checked_prod({Tn, Tn, 2}, "two Gram matrices 2 x T x T"),
                "two T x T Gram matrices (T = " + std::to_string(Tn) + ")");
  check_flops(double(x.shape(0)) * double(Tn) * double(Tn) *
                  double(x.shape(2) + hp.shape(2) + 2 * gi.shape(2)), "these recurrent norms");
  const int threads = checked_threads(num_threads);
  if (x.dtype().itemsize() == 4) return ghost_impl<float>(x, hp, gi, gh, threads);
  return ghost_impl<double>(x, hp, gi, gh, threads);
}

}  // namespace

void bind_rnn(py::module_& m) {
  m.def("rnn_ghost_sq_norms", &rnn_ghost_sq_norms, py::arg("inputs"), py::arg("h_prev"),
        py::arg("g_ih"), py::arg("g_hh") = py::none(), py::arg("num_threads") = 1,
        "Per-example squared norms of weight_ih and weight_hh gradients of one recurrent layer,\n"
        "ghost identity with one Gram of G shared by both (g_hh None: the same G). Returns\n"
        "(w_ih_sq (B,), w_hh_sq (B,)) in the input dtype.");
  m.def("rnn_forward", &rnn_forward, py::arg("cell"), py::arg("input"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih") = py::none(), py::arg("b_hh") = py::none(),
        py::arg("h0") = py::none(), py::arg("c0") = py::none(), py::arg("lengths") = py::none(),
        py::arg("reverse") = false, py::arg("num_threads") = 1,
        "One recurrent layer and direction, forward through time.\n\n"
        "cell: 'lstm' | 'gru' | 'rnn_tanh' | 'rnn_relu'; input (B, T, d) with a contiguous last\n"
        "dim; weights (gates*h, d), (gates*h, h) and biases (gates*h,) contiguous; h0/c0 (B, h).\n"
        "Returns (out, h_n, c_n, saved, h_prev, c_prev, tanh_c); c_* are None unless LSTM.");
  m.def("rnn_backward", &rnn_backward, py::arg("cell"), py::arg("grad_output"),
        py::arg("grad_h_n"), py::arg("grad_c_n"), py::arg("w_ih"), py::arg("w_hh"),
        py::arg("saved"), py::arg("h_prev"), py::arg("c_prev") = py::none(),
        py::arg("tanh_c") = py::none(), py::arg("lengths") = py::none(),
        py::arg("reverse") = false, py::arg("need_input_grad") = true,
        py::arg("num_threads") = 1,
        "Backward through time of rnn_forward. Returns (g_ih, g_hh, d_input, d_h0, d_c0, g_sum,\n"
        "g_hh_sum): g_sum (B, gates*h) the sum over t of g_ih (g_hh_sum: GRU only);\n"
        "g_ih (B, T, gates*h) the gradient at the input projection's pre-activations, g_hh the one\n"
        "at W_hh h + b_hh (GRU only, else None), d_input (B, T, d) or None.");
}

}  // namespace fastclip_py
