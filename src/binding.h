// Shared by the binding files of fastclip._C: argument checks that raise TypeError/ValueError with
// the actual values, and zero-copy views of numpy arrays for the core.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <thread>

#include "../csrc/common.h"

namespace fastclip_py {

namespace py = pybind11;
using fastclip::View3;


inline std::string type_name(const py::handle& obj) { return py::str(py::type::of(obj).attr("__name__")); }
inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()); }

// Size arithmetic on user-controlled sizes. The core forms buffers and loop bounds from products
// and sums of sizes; a wrapped value passes a later check (a kernel of 2^62 x 4 "is" 0) and the
// kernel then writes past its buffer. Every such product is formed here first, checked, so the
// core only ever sees sizes whose arithmetic is exact in int64.
inline int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  if (a < 0 || b < 0)
    throw py::value_error(what + " has a negative size: " + std::to_string(a) + " x " + std::to_string(b));
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r))
    throw py::value_error(what + " " + std::to_string(a) + " x " + std::to_string(b) + " overflows int64");
  return r;
}

inline int64_t checked_prod(std::initializer_list<int64_t> sizes, const std::string& what) {
  int64_t r = 1;
  std::string factors;
  for (int64_t s : sizes) factors += (factors.empty() ? "" : " x ") + std::to_string(s);
  for (int64_t s : sizes) {
    if (s < 0) throw py::value_error(what + " has a negative size: " + factors);
    if (__builtin_mul_overflow(r, s, &r))
      throw py::value_error(what + " " + factors + " overflows int64");
  }
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r))
    throw py::value_error(what + " " + std::to_string(a) + " + " + std::to_string(b) + " overflows int64");
  return r;
}

// No array the core reads may declare more elements than this (2^34: 64 GiB of float32), and no
// buffer it allocates may hold more. Zero-stride views declare any shape without memory; without
// a cap, a (2, 2^40, 4) view would mean hours of work or a failed allocation (MemoryError), where
// the contract is a ValueError naming the size.
constexpr int64_t kMaxElements = int64_t(1) << 34;
// A per-thread scratch buffer of the core (one example's unfold, Gram matrices, sorted tokens)
// is held once per thread: 2^30 elements (4 GiB of float32) is far beyond any real layer.
constexpr int64_t kMaxScratch = int64_t(1) << 30;

inline void check_elements(int64_t n, const std::string& what) {
  if (n < 0 || n > kMaxElements)
    throw py::value_error(what + " would hold " + std::to_string(n) + " elements, more than the " +
                          std::to_string(kMaxElements) + " fastclip's native core handles per buffer");
}

inline void check_scratch(int64_t n, const std::string& what) {
  if (n < 0 || n > kMaxScratch)
    throw py::value_error(what + " would need " + std::to_string(n) + " elements of scratch per thread, "
                          "more than the " + std::to_string(kMaxScratch) + " fastclip's native core allows");
}

// Flops of one call above which it is refused as a size error rather than run (about a day on a
// many-core CPU; a real layer's per-example norms are orders of magnitude below).
constexpr double kMaxFlops = 1e17;

inline void check_flops(double flops, const std::string& what) {
  if (!(flops <= kMaxFlops))
    throw py::value_error(what + " would take about " + std::to_string(flops) +
                          " flops, more than the " + std::to_string(kMaxFlops) +
                          " a native call is allowed; the sizes are out of range");
}

// The number of elements an array declares (its shape's product), checked against kMaxElements.
inline int64_t declared_elements(const py::array& a, const std::string& name) {
  int64_t n = 1;
  std::string shape;
  for (py::ssize_t k = 0; k < a.ndim(); ++k) {
    shape += (k ? ", " : "") + std::to_string(a.shape(k));
    n = checked_mul(n, a.shape(k), name + " shape");
  }
  if (n > kMaxElements)
    throw py::value_error(name + " declares " + std::to_string(n) + " elements (shape (" + shape +
                          ")), more than the " + std::to_string(kMaxElements) +
                          " fastclip's native core handles per array");
  return n;
}

// Every stride the core follows (dims of size > 1) is non-negative and a whole number of items,
// and the data is aligned: what the kernels' plain pointer arithmetic assumes.
inline void check_layout(const py::array& a, const std::string& name) {
  declared_elements(a, name);
  if (a.size() == 0) return;  // nothing is read
  const auto item = static_cast<py::ssize_t>(a.dtype().itemsize());
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
  if (!(py::detail::array_proxy(a.ptr())->flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(name + " data is not aligned to its item size");
}

// A float32/float64 numpy array of rank 2 or 3 whose strides the core can use as they are.
inline py::array checked_array(const py::object& obj, const std::string& name) {
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
  declared_elements(a, name);
  if (a.size() == 0) return a;  // nothing is read, so strides and alignment do not matter
  check_layout(a, name);
  const auto item = static_cast<py::ssize_t>(dt.itemsize());
  const auto last = a.ndim() - 1;
  if (a.shape(last) > 1 && a.strides(last) != item)
    throw py::value_error(name + " must have unit stride on its last dim, got " +
                          std::to_string(a.strides(last) / item) + " elements; make it contiguous");
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

// num_threads from Python, checked and capped: more threads than cores only adds switching.
inline int checked_threads(int num_threads) {
  if (num_threads < 1)
    throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  static const int cap = static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) * 4;
  return std::min(num_threads, cap);
}

// One registration function per layer family / op group, each in its own src/bind_*.cpp.
void bind_linear(py::module_& m);
void bind_noise(py::module_& m);
void bind_conv(py::module_& m);
void bind_embedding(py::module_& m);
void bind_norm(py::module_& m);
void bind_rnn(py::module_& m);

}  // namespace fastclip_py
