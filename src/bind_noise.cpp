// Bindings of the Gaussian noise kernels (csrc/noise.h).
#include <cmath>
#include <vector>

#include <pybind11/stl.h>

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

// The arrays of a list, checked as add_gaussian_noise checks one (writeable only when written).
template <class T>
std::vector<T*> arrays_of(const py::list& xs, bool f32, std::vector<int64_t>& ns,
                          std::vector<py::array>& keep, bool writeable) {
  std::vector<T*> ptrs;
  auto& api = py::detail::npy_api::get();
  for (const auto& item : xs) {
    if (!py::isinstance<py::array>(item))
      throw py::type_error("xs must hold numpy.ndarray, got " + type_name(py::reinterpret_borrow<py::object>(item)));
    auto x = py::reinterpret_borrow<py::array>(item);
    const bool ok = api.PyArray_EquivTypes_(
        x.dtype().ptr(), (f32 ? py::dtype::of<float>() : py::dtype::of<double>()).ptr());
    if (!ok)
      throw py::type_error(std::string("every array must be ") + (f32 ? "float32" : "float64") +
                           " (native byte order, one dtype for all), got " + dtype_name(x));
    const int flags = py::detail::array_proxy(x.ptr())->flags;
    if (!(flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
      throw py::value_error("every array must be C-contiguous");
    if (writeable && !(flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_))
      throw py::value_error("every array must be writeable");
    if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
      throw py::value_error("array data is not aligned to its item size");
    ptrs.push_back(static_cast<T*>(const_cast<void*>(x.data())));
    ns.push_back(x.size());
    keep.push_back(x);
  }
  return ptrs;
}

bool first_is_f32(const py::list& xs) {
  if (xs.size() == 0) return true;
  py::handle h = xs[0];
  if (!py::isinstance<py::array>(h))
    throw py::type_error("xs must hold numpy.ndarray, got " + type_name(py::reinterpret_borrow<py::object>(h)));
  auto x = py::reinterpret_borrow<py::array>(h);
  auto& api = py::detail::npy_api::get();
  if (api.PyArray_EquivTypes_(x.dtype().ptr(), py::dtype::of<float>().ptr())) return true;
  if (api.PyArray_EquivTypes_(x.dtype().ptr(), py::dtype::of<double>().ptr())) return false;
  throw py::type_error("arrays must be float32 or float64 (native byte order), got " + dtype_name(x));
}

bool add_gaussian_noise_checked(const py::list& xs, double std, double scale,
                                const std::vector<uint64_t>& seeds, int num_threads) {
  check_scalars(std, scale);
  num_threads = checked_threads(num_threads);
  if (seeds.size() != xs.size())
    throw py::value_error("seeds must have one entry per array: " + std::to_string(seeds.size()) +
                          " seeds for " + std::to_string(xs.size()) + " arrays");
  const bool f32 = first_is_f32(xs);
  std::vector<int64_t> ns;
  std::vector<py::array> keep;
  if (f32) {
    auto ptrs = arrays_of<float>(xs, true, ns, keep, true);
    py::gil_scoped_release release;
    return fastclip::add_gaussian_noise_checked(ptrs.data(), ns.data(), static_cast<int64_t>(ptrs.size()),
                                                std, scale, seeds.data(), num_threads);
  }
  auto ptrs = arrays_of<double>(xs, false, ns, keep, true);
  py::gil_scoped_release release;
  return fastclip::add_gaussian_noise_checked(ptrs.data(), ns.data(), static_cast<int64_t>(ptrs.size()),
                                              std, scale, seeds.data(), num_threads);
}

bool all_finite(const py::list& xs, int num_threads) {
  num_threads = checked_threads(num_threads);
  const bool f32 = first_is_f32(xs);
  std::vector<int64_t> ns;
  std::vector<py::array> keep;
  if (f32) {
    auto ptrs = arrays_of<float>(xs, true, ns, keep, false);
    std::vector<const float*> c(ptrs.begin(), ptrs.end());
    py::gil_scoped_release release;
    return fastclip::all_finite(c.data(), ns.data(), static_cast<int64_t>(c.size()), num_threads);
  }
  auto ptrs = arrays_of<double>(xs, false, ns, keep, false);
  std::vector<const double*> c(ptrs.begin(), ptrs.end());
  py::gil_scoped_release release;
  return fastclip::all_finite(c.data(), ns.data(), static_cast<int64_t>(c.size()), num_threads);
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
  m.def("add_gaussian_noise_checked", &add_gaussian_noise_checked, py::arg("xs"), py::arg("std"),
        py::arg("scale"), py::arg("seeds"), py::arg("num_threads") = 1,
        "Checks every array finite first; if one is not, returns False having written nothing.\n"
        "Otherwise, in place, xs[t] = (xs[t] + std * z) * scale with z from the stream (seeds[t])\n"
        "exactly as add_gaussian_noise(xs[t], std, scale, seeds[t]) does, and returns True.\n"
        "xs: a list of C-contiguous arrays, all float32 or all float64.");
  m.def("all_finite", &all_finite, py::arg("xs"), py::arg("num_threads") = 1,
        "Whether every element of every array in xs (a list, all float32 or all float64) is finite.");
  m.def("gaussian", &gaussian, py::arg("n"), py::arg("seed") = 0, py::arg("num_threads") = 1,
        "The first n standard normals of the stream (seed), float32.");
}

}  // namespace fastclip_py
