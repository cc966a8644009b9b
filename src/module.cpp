// fastclip._C: where Python meets the C++ core. Every argument is validated here, with the actual
// values in the message (TypeError for wrong types/dtypes, ValueError for wrong shapes/strides);
// arrays are used in place, never copied, and the GIL is released around the compute.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <thread>

#include "../csrc/blas.h"
#include "../csrc/common.h"
#include "../csrc/linear.h"

namespace py = pybind11;
using fastclip::View3;

namespace {

std::string type_name(const py::handle& obj) { return py::str(py::type::of(obj).attr("__name__")); }
std::string dtype_name(const py::array& a) { return py::str(a.dtype()); }

// A float32/float64 numpy array of rank 2 or 3 whose strides the core can use as they are.
py::array checked_array(const py::object& obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be a numpy.ndarray, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  const auto dt = a.dtype();
  auto& api = py::detail::npy_api::get();
  if (!api.PyArray_EquivTypes_(dt.ptr(), py::dtype::of<float>().ptr()) &&
      !api.PyArray_EquivTypes_(dt.ptr(), py::dtype::of<double>().ptr()))
    throw py::type_error(name + " must be float32 or float64 (native byte order), got " +
                         dtype_name(a));
  if (a.ndim() != 2 && a.ndim() != 3)
    throw py::value_error(name + " must be 2-D or 3-D, got " + std::to_string(a.ndim()) + "-D");
  if (a.size() == 0) return a;  // nothing is read, so strides and alignment do not matter
  const auto item = static_cast<py::ssize_t>(dt.itemsize());
  for (py::ssize_t k = 0; k < a.ndim(); ++k) {
    const auto s = a.strides(k);
    if (a.shape(k) <= 1) continue;  // a stride along a dim of size 0 or 1 is never followed
    if (s < 0)
      throw py::value_error(name + " has a negative stride on dim " + std::to_string(k) + " (" +
                            std::to_string(s) + " bytes); pass a copy with non-negative strides");
    if (s % item != 0)
      throw py::value_error(name + " stride on dim " + std::to_string(k) + " (" +
                            std::to_string(s) + " bytes) is not a multiple of the item size " +
                            std::to_string(item));
  }
  const auto last = a.ndim() - 1;
  if (a.shape(last) > 1 && a.strides(last) != item)
    throw py::value_error(name + " must have unit stride on its last dim, got " +
                          std::to_string(a.strides(last) / item) + " elements; make it contiguous");
  if (!(py::detail::array_proxy(a.ptr())->flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(name + " data is not aligned to its item size");
  return a;
}

template <class T>
View3<T> view_of(const py::array& a) {
  const auto item = static_cast<int64_t>(sizeof(T));
  auto stride = [&](py::ssize_t k) { return a.shape(k) <= 1 ? int64_t(0) : int64_t(a.strides(k)) / item; };
  View3<T> v;
  v.data = static_cast<const T*>(a.data());
  v.n0 = a.shape(0);
  v.s0 = stride(0);
  if (a.ndim() == 2) {
    v.n1 = 1;
    v.n2 = a.shape(1);
  } else {
    v.n1 = a.shape(1);
    v.s1 = stride(1);
    v.n2 = a.shape(2);
  }
  return v;
}

template <class T>
py::tuple run_linear(const py::array& A, const py::array& G, fastclip::LinearMethod method,
                     bool bias, int num_threads) {
  const View3<T> a = view_of<T>(A), g = view_of<T>(G);
  py::array_t<T> w(a.n0);
  py::object b = py::none();
  T* b_ptr = nullptr;
  if (bias) {
    py::array_t<T> bb(a.n0);
    b_ptr = bb.mutable_data();
    b = bb;
  }
  T* w_ptr = w.mutable_data();
  {
    py::gil_scoped_release release;
    fastclip::linear_sq_norms<T>(a, g, method, w_ptr, b_ptr, num_threads);
  }
  return py::make_tuple(w, b);
}

py::tuple linear_sq_norms(const py::object& A_obj, const py::object& G_obj, const std::string& method_name,
                          bool bias, int num_threads) {
  const auto method = fastclip::parse_linear_method(method_name);
  if (num_threads < 1)
    throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  const py::array A = checked_array(A_obj, "activations");
  const py::array G = checked_array(G_obj, "gradients");
  if (A.dtype().itemsize() != G.dtype().itemsize())
    throw py::type_error("activations and gradients dtypes differ: " + dtype_name(A) + " vs " +
                         dtype_name(G));
  if (A.ndim() != G.ndim())
    throw py::value_error("activations and gradients ranks differ: " + std::to_string(A.ndim()) +
                          "-D vs " + std::to_string(G.ndim()) + "-D");
  if (A.shape(0) != G.shape(0))
    throw py::value_error("batch sizes differ: " + std::to_string(A.shape(0)) + " vs " +
                          std::to_string(G.shape(0)));
  if (A.ndim() == 3 && A.shape(1) != G.shape(1))
    throw py::value_error("positions (T) differ: " + std::to_string(A.shape(1)) + " vs " +
                          std::to_string(G.shape(1)));
  // More threads than cores only adds switching; the pool would still cap them at B.
  static const int cap = static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) * 4;
  num_threads = std::min(num_threads, cap);
  if (A.dtype().itemsize() == 4) return run_linear<float>(A, G, method, bias, num_threads);
  return run_linear<double>(A, G, method, bias, num_threads);
}

std::string choose_linear_method(int64_t T, int64_t d, int64_t p) {
  if (T < 0 || d < 0 || p < 0)
    throw py::value_error("sizes must be >= 0, got T=" + std::to_string(T) + ", d=" +
                          std::to_string(d) + ", p=" + std::to_string(p));
  return fastclip::linear_method_name(fastclip::choose_linear_method(T, d, p));
}

bool set_blas_library(const std::string& path) { return fastclip::blas::load(path); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclip native core (C++17): per-example gradient norm kernels.";
  m.def("linear_sq_norms", &linear_sq_norms, py::arg("activations"), py::arg("gradients"),
        py::arg("method") = "auto", py::arg("bias") = false, py::arg("num_threads") = 1,
        "Per-example squared weight (and bias) gradient norms of a linear layer.\n\n"
        "activations (B, d) or (B, T, d), gradients (B, p) or (B, T, p): float32/float64 arrays\n"
        "with non-negative strides and a contiguous last dim. Returns (w_sq (B,), b_sq (B,) or None)\n"
        "in the input dtype.");
  m.def("choose_linear_method", &choose_linear_method, py::arg("T"), py::arg("d"), py::arg("p"),
        "'product' for T <= 1, else the cheaper of 'ghost' and 'direct' by flop count.");
  m.def("set_blas_library", &set_blas_library, py::arg("path"),
        "Load OpenBLAS (scipy-openblas32 build, scipy_ symbol prefix) from path; False if unusable.");
  m.def("set_blas_enabled", &fastclip::blas::set_enabled, py::arg("enabled"),
        "Use (True) or bypass (False) the loaded BLAS; returns the previous setting.");
  m.def("blas_info", &fastclip::blas::info, "Which BLAS the kernels use.");
}
