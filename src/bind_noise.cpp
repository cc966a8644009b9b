// Bindings of the Gaussian noise kernels (csrc/noise.h).
#include <cmath>

#include "binding.h"

#include "../csrc/noise.h"

namespace fastclip_py {
namespace {

void check_scalars(double std, double scale) {
  if (!(std >= 0.0) || !std::isfinite(std))
    throw py::value_error("std must be a finite number >= 0, got " + std::to_string(std));
  if (!std::isfinite(scale))
    throw py::value_error("scale must be finite, got " + std::to_string(scale));
}

template <class T>
void run_noise(py::array& x, double std, double scale, uint64_t seed, int num_threads) {
  T* data = static_cast<T*>(x.mutable_data());
  const int64_t n = x.size();
  py::gil_scoped_release release;
  fastclip::add_gaussian_noise(data, n, std, scale, seed, num_threads);
}

void add_gaussian_noise(const py::object& obj, double std, double scale, uint64_t seed,
                        int num_threads) {
  check_scalars(std, scale);
  num_threads = checked_threads(num_threads);
  if (!py::isinstance<py::array>(obj))
    throw py::type_error("x must be a numpy.ndarray, got " + type_name(obj));
  auto x = py::reinterpret_borrow<py::array>(obj);
  auto& api = py::detail::npy_api::get();
  const bool f32 = api.PyArray_EquivTypes_(x.dtype().ptr(), py::dtype::of<float>().ptr());
  const bool f64 = api.PyArray_EquivTypes_(x.dtype().ptr(), py::dtype::of<double>().ptr());
  if (!f32 && !f64)
    throw py::type_error("x must be float32 or float64 (native byte order), got " + dtype_name(x));
  const int flags = py::detail::array_proxy(x.ptr())->flags;
  if (!(flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
    throw py::value_error("x must be C-contiguous (the noise is written element by element)");
  if (!(flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_))
    throw py::value_error("x must be writeable");
  if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error("x data is not aligned to its item size");
  if (f32)
    run_noise<float>(x, std, scale, seed, num_threads);
  else
    run_noise<double>(x, std, scale, seed, num_threads);
}

py::array_t<float> gaussian(int64_t n, uint64_t seed, int num_threads) {
  if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
  check_elements(n, "gaussian(n)");
  num_threads = checked_threads(num_threads);
  py::array_t<float> out(n);
  float* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    fastclip::gaussian(data, n, seed, num_threads);
  }
  return out;
}

}  // namespace

void bind_noise(py::module_& m) {
  m.def("add_gaussian_noise", &add_gaussian_noise, py::arg("x"), py::arg("std"),
        py::arg("scale") = 1.0, py::arg("seed") = 0, py::arg("num_threads") = 1,
        "In place: x = (x + std * z) * scale, z ~ N(0, 1) i.i.d. from the counter-based stream\n"
        "(seed); the values do not depend on num_threads. x: C-contiguous float32/float64 array.");
  m.def("gaussian", &gaussian, py::arg("n"), py::arg("seed") = 0, py::arg("num_threads") = 1,
        "The first n standard normals of the stream (seed), float32.");
}

}  // namespace fastclip_py
