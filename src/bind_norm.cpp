// Bindings of the normalisation-layer kernels (csrc/norm.h): per-example affine gradients of
// LayerNorm / RMSNorm ("last dims") and GroupNorm / InstanceNorm ("channel").
#include "binding.h"

#include <cmath>

#include "../csrc/norm.h"

namespace fastclip_py {
namespace {

// x and g: same dtype, both exactly 3-D, same shape (batch size checked first, with its values).
py::array checked_3d(const py::object& obj, const std::string& name, const std::string& layout) {
  py::array a = checked_array(obj, name);
  if (a.ndim() != 3)
    throw py::value_error(name + " must be 3-D " + layout + ", got " + std::to_string(a.ndim()) + "-D");
  return a;
}

void check_pair(const py::array& x, const py::array& g) {
  if (x.dtype().itemsize() != g.dtype().itemsize())
    throw py::type_error("x and g dtypes differ: " + dtype_name(x) + " vs " + dtype_name(g));
  if (x.shape(0) != g.shape(0))
    throw py::value_error("batch sizes differ: " + std::to_string(x.shape(0)) + " vs " +
                          std::to_string(g.shape(0)));
  if (x.shape(1) != g.shape(1) || x.shape(2) != g.shape(2))
    throw py::value_error("x and g shapes differ: (" + std::to_string(x.shape(0)) + ", " +
                          std::to_string(x.shape(1)) + ", " + std::to_string(x.shape(2)) + ") vs (" +
                          std::to_string(g.shape(0)) + ", " + std::to_string(g.shape(1)) + ", " +
                          std::to_string(g.shape(2)) + ")");
}

double checked_eps(double eps) {
  if (!(std::isfinite(eps) && eps >= 0.0))
    throw py::value_error("eps must be finite and >= 0, got " + std::to_string(eps));
  return eps;
}

// Per-channel running statistics: None, or a contiguous, aligned float64 1-D array of length C.
py::object checked_stats(const py::object& obj, const std::string& name, py::ssize_t C) {
  if (obj.is_none()) return obj;
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be None or a numpy.ndarray, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  auto& api = py::detail::npy_api::get();
  if (!api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<double>().ptr()))
    throw py::type_error(name + " must be float64 (native byte order), got " + dtype_name(a));
  if (a.ndim() != 1)
    throw py::value_error(name + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
  if (a.shape(0) != C)
    throw py::value_error(name + " has " + std::to_string(a.shape(0)) + " entries, expected one per channel (" +
                          std::to_string(C) + ")");
  if (C > 1 && a.strides(0) != static_cast<py::ssize_t>(sizeof(double)))
    throw py::value_error(name + " must be contiguous, got a stride of " + std::to_string(a.strides(0)) +
                          " bytes");
  if (!(py::detail::array_proxy(a.ptr())->flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(name + " data is not aligned to its item size");
  return a;
}

template <class T>
py::tuple run_last(const py::array& X, const py::array& G, bool rms, double eps, bool bias,
                   int num_threads) {
  const View3<T> x = view_of<T>(X), g = view_of<T>(G);
  py::array_t<T> gw({x.n0, x.n2});
  py::object gb_obj = py::none();
  T* gb = nullptr;
  if (bias) {
    py::array_t<T> b({x.n0, x.n2});
    gb = b.mutable_data();
    gb_obj = b;
  }
  T* w = gw.mutable_data();
  {
    py::gil_scoped_release release;
    fastclip::last_dims_affine_grads<T>(x, g, rms, eps, w, gb, num_threads);
  }
  return py::make_tuple(gw, gb_obj);
}

template <class T>
py::tuple run_channel(const py::array& X, const py::array& G, int64_t groups, double eps,
                      const py::object& mean, const py::object& var, bool bias, int num_threads) {
  const View3<T> x = view_of<T>(X), g = view_of<T>(G);
  const double* m = mean.is_none() ? nullptr : static_cast<const double*>(py::reinterpret_borrow<py::array>(mean).data());
  const double* v = var.is_none() ? nullptr : static_cast<const double*>(py::reinterpret_borrow<py::array>(var).data());
  py::array_t<T> gw({x.n0, x.n1});
  py::object gb_obj = py::none();
  T* gb = nullptr;
  if (bias) {
    py::array_t<T> b({x.n0, x.n1});
    gb = b.mutable_data();
    gb_obj = b;
  }
  T* w = gw.mutable_data();
  {
    py::gil_scoped_release release;
    fastclip::channel_affine_grads<T>(x, g, groups, eps, m, v, w, gb, num_threads);
  }
  return py::make_tuple(gw, gb_obj);
}

py::tuple last_dims_affine_grads(const py::object& x_obj, const py::object& g_obj, double eps,
                                 bool rms, bool bias, int num_threads) {
  const py::array X = checked_3d(x_obj, "x", "(B, T, N)");
  const py::array G = checked_3d(g_obj, "g", "(B, T, N)");
  check_pair(X, G);
  eps = checked_eps(eps);
  num_threads = checked_threads(num_threads);
  if (X.dtype().itemsize() == 4) return run_last<float>(X, G, rms, eps, bias, num_threads);
  return run_last<double>(X, G, rms, eps, bias, num_threads);
}

py::tuple channel_affine_grads(const py::object& x_obj, const py::object& g_obj, int64_t groups,
                               double eps, const py::object& mean_obj, const py::object& var_obj,
                               bool bias, int num_threads) {
  const py::array X = checked_3d(x_obj, "x", "(B, C, S)");
  const py::array G = checked_3d(g_obj, "g", "(B, C, S)");
  check_pair(X, G);
  eps = checked_eps(eps);
  const auto C = X.shape(1);
  if (groups < 1) throw py::value_error("groups must be >= 1, got " + std::to_string(groups));
  if (C % groups != 0)
    throw py::value_error("groups (" + std::to_string(groups) + ") must divide the number of channels (" +
                          std::to_string(C) + ")");
  const py::object mean = checked_stats(mean_obj, "mean", C);
  const py::object var = checked_stats(var_obj, "var", C);
  if (mean.is_none() != var.is_none())
    throw py::value_error("give both mean and var, or neither");
  if (!mean.is_none() && groups != C)
    throw py::value_error("per-channel statistics need groups == channels, got groups = " +
                          std::to_string(groups) + ", channels = " + std::to_string(C));
  num_threads = checked_threads(num_threads);
  if (X.dtype().itemsize() == 4)
    return run_channel<float>(X, G, groups, eps, mean, var, bias, num_threads);
  return run_channel<double>(X, G, groups, eps, mean, var, bias, num_threads);
}

}  // namespace

void bind_norm(py::module_& m) {
  m.def("last_dims_affine_grads", &last_dims_affine_grads, py::arg("x"), py::arg("g"),
        py::arg("eps"), py::arg("rms") = false, py::arg("bias") = true, py::arg("num_threads") = 1,
        "Per-example weight (and bias) gradients of LayerNorm (rms=False) or RMSNorm (rms=True).\n\n"
        "x: layer inputs, g: gradients at the layer output, both (B, T, N) float32/float64 arrays\n"
        "with non-negative strides and a contiguous last dim; statistics over N.\n"
        "Returns (gw (B, N), gb (B, N) or None) in the input dtype.");
  m.def("channel_affine_grads", &channel_affine_grads, py::arg("x"), py::arg("g"),
        py::arg("groups"), py::arg("eps"), py::arg("mean") = py::none(), py::arg("var") = py::none(),
        py::arg("bias") = true, py::arg("num_threads") = 1,
        "Per-example weight (and bias) gradients of GroupNorm / InstanceNorm.\n\n"
        "x, g: (B, C, S) float32/float64 arrays (contiguous last dim); statistics over each group of\n"
        "C / groups channels x S positions, or, if mean and var (float64, (C,)) are given, those\n"
        "per-channel statistics (groups == C). Returns (gw (B, C), gb (B, C) or None).");
}

}  // namespace fastclip_py
