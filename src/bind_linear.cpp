// Bindings of the linear-layer kernels and of the BLAS loader.
#include "binding.h"
#include "scratch.h"

#include "../csrc/blas.h"
#include "../csrc/gemm_avx512.h"
#include "../csrc/linear.h"

namespace fastclip_py {
namespace {

template <class T>
py::tuple run_linear(const py::array& A, const py::array& G, fastclip::LinearMethod method,
                     bool bias, int num_threads, int64_t scratch) {
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
    const ScratchUse use(scratch * int64_t(sizeof(T)) + (bias ? g.n2 * 8 : 0),
                         std::min<int64_t>(num_threads, a.n0));
    py::gil_scoped_release release;
    fastclip::linear_sq_norms<T>(a, g, method, w_ptr, b_ptr, num_threads);
  }
  return py::make_tuple(w, b);
}

py::tuple linear_sq_norms(const py::object& A_obj, const py::object& G_obj, const std::string& method_name,
                          bool bias, int num_threads) {
  const auto method = fastclip::parse_linear_method(method_name);
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
  // Zero-stride views declare sizes without memory: the work is bounded here, not the memory.
  const double B = double(A.shape(0)), T = A.ndim() == 3 ? double(A.shape(1)) : 1.0;
  const double d = double(A.shape(A.ndim() - 1)), p = double(G.shape(G.ndim() - 1));
  auto m = method;
  if (m == fastclip::LinearMethod::Auto)
    m = fastclip::choose_linear_method(int64_t(T), int64_t(d), int64_t(p));
  const double per = T <= 1.0 ? d + p
                     : m == fastclip::LinearMethod::Ghost ? T * T * (d + p + 2.0)
                                                          : (2.0 * T + 2.0) * d * p;
  check_flops(B * (per + T * p), "this linear layer's norms");
  num_threads = checked_threads(num_threads);
  // Per-thread scratch, as csrc/linear.cpp sizes it: two 256 x 256 Gram tiles (ghost) or one
  // min(p, 128) x min(d, 2048) tile of G_i^T A_i (direct); none for T = 1.
  int64_t scratch = T <= 1.0 ? 0
                    : m == fastclip::LinearMethod::Ghost ? 2 * 256 * 256
                    : std::min<int64_t>(int64_t(p), 128) * std::min<int64_t>(int64_t(d), 2048);
  // float32 on the AVX-512 kernels (gemm_avx512.h) also holds, per thread, the packed rows of a
  // tile (6 x 128 per 6 rows) and, for the ghost tiles' A B^T forms, both factors transposed.
  if (T > 1.0 && A.dtype().itemsize() == 4 && fastclip::gemm_kernels_enabled())
    scratch += m == fastclip::LinearMethod::Ghost
                   ? 256 * 128 + 2 * 256 * int64_t(std::max(d, p))
                   : 128 * 128;
  if (A.dtype().itemsize() == 4) return run_linear<float>(A, G, method, bias, num_threads, scratch);
  return run_linear<double>(A, G, method, bias, num_threads, scratch);
}

std::string choose_linear_method(int64_t T, int64_t d, int64_t p) {
  if (T < 0 || d < 0 || p < 0)
    throw py::value_error("sizes must be >= 0, got T=" + std::to_string(T) + ", d=" +
                          std::to_string(d) + ", p=" + std::to_string(p));
  return fastclip::linear_method_name(fastclip::choose_linear_method(T, d, p));
}

// A 2-D array of clipped_gemm's A or G: `kind`'s element size, unit stride on its last dim,
// non-negative strides (check_layout).
py::array gemm_operand(const py::object& obj, const std::string& name, fastclip::GemmInput kind) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be a numpy.ndarray, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  auto& api = py::detail::npy_api::get();
  const bool f32 = api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<float>().ptr());
  const bool i16 = api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<int16_t>().ptr()) ||
                   api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<uint16_t>().ptr());
  const bool wide = kind == fastclip::GemmInput::Float32;
  const std::string kind_name = wide ? "float32"
                                : kind == fastclip::GemmInput::BFloat16 ? "bfloat16" : "float16";
  if (wide ? !f32 : !i16)
    throw py::type_error(name + " must be " + (wide ? "float32" : "16-bit (the raw bits)") +
                         " for kind '" + kind_name + "', got " + dtype_name(a));
  if (a.ndim() != 2)
    throw py::value_error(name + " must be 2-D (rows, features), got " + std::to_string(a.ndim()) +
                          "-D");
  check_layout(a, name);
  const auto item = static_cast<py::ssize_t>(a.dtype().itemsize());
  if (a.size() > 0 && a.shape(1) > 1 && a.strides(1) != item)
    throw py::value_error(name + " must have unit stride on its last dim, got " +
                          std::to_string(a.strides(1) / item) + " elements; make it contiguous");
  return a;
}

py::object clipped_gemm(const py::object& A_obj, const py::object& G_obj, const py::object& c_obj,
                        int64_t T, const std::string& kind_name, int num_threads,
                        const py::object& out_obj) {
  if (!fastclip::small_gemm_available())
    throw py::value_error(std::string("clipped_gemm needs an x86-64 CPU with AVX-512 (this "
                                      "process runs '") + fastclip::isa_name() + "' kernels)");
  fastclip::GemmInput kind;
  if (kind_name == "float32") kind = fastclip::GemmInput::Float32;
  else if (kind_name == "bfloat16") kind = fastclip::GemmInput::BFloat16;
  else if (kind_name == "float16") kind = fastclip::GemmInput::Float16;
  else
    throw py::value_error("kind must be 'float32', 'bfloat16' or 'float16', got '" + kind_name +
                          "'");
  const py::array A = gemm_operand(A_obj, "activations", kind);
  const py::array G = gemm_operand(G_obj, "gradients", kind);
  if (!py::isinstance<py::array>(c_obj))
    throw py::type_error("factors must be a numpy.ndarray, got " + type_name(c_obj));
  const auto c = py::reinterpret_borrow<py::array>(c_obj);
  auto& api = py::detail::npy_api::get();
  if (!api.PyArray_EquivTypes_(c.dtype().ptr(), py::dtype::of<float>().ptr()))
    throw py::type_error("factors must be float32, got " + dtype_name(c));
  const int64_t N = A.shape(0), d = A.shape(1), p = G.shape(1);
  if (G.shape(0) != N)
    throw py::value_error("rows differ: activations " + std::to_string(N) + ", gradients " +
                          std::to_string(G.shape(0)));
  if (T < 1) throw py::value_error("T must be >= 1, got " + std::to_string(T));
  if (c.ndim() != 1 || checked_mul(c.shape(0), T, "factors x T") != N)
    throw py::value_error("factors must be 1-D with rows / T = " + std::to_string(N) + " / " +
                          std::to_string(T) + " entries, got shape of rank " +
                          std::to_string(c.ndim()) +
                          (c.ndim() == 1 ? " and " + std::to_string(c.shape(0)) + " entries" : ""));
  if (c.shape(0) > 1 && c.strides(0) != py::ssize_t(sizeof(float)))
    throw py::value_error("factors must be contiguous");
  check_layout(c, "factors");
  check_flops(2.0 * double(N) * double(p) * double(d), "this clipped sum");
  num_threads = checked_threads(num_threads);
  const auto item = static_cast<int64_t>(A.dtype().itemsize());
  const int64_t lda = N > 1 ? int64_t(A.strides(0)) / item : d;
  const int64_t ldg = N > 1 ? int64_t(G.strides(0)) / item : p;
  // The result: into `out` when given (the caller allocates it through torch, so a memory
  // profile sees it), else a new array.
  py::array out;
  if (out_obj.is_none()) {
    out = py::array_t<float>({p, d});
  } else {
    if (!py::isinstance<py::array>(out_obj))
      throw py::type_error("out must be a numpy.ndarray or None, got " + type_name(out_obj));
    out = py::reinterpret_borrow<py::array>(out_obj);
    if (!api.PyArray_EquivTypes_(out.dtype().ptr(), py::dtype::of<float>().ptr()) ||
        out.ndim() != 2 || out.shape(0) != p || out.shape(1) != d ||
        !(out.flags() & py::array::c_style) || !out.writeable())
      throw py::value_error("out must be a writeable C-contiguous float32 array of shape (" +
                            std::to_string(p) + ", " + std::to_string(d) + ")");
  }
  float* o = static_cast<float*>(out.mutable_data());
  const float* cp = static_cast<const float*>(c.data());
  const void* ap = A.data();
  const void* gp = G.data();
  {
    // Per thread: the packed, rescaled rows of G (6 x 128 per block of 6 of C's rows) and, for
    // half-precision input, one widened 128 x 64 panel of A.
    const int64_t blocks = (p + 5) / 6;
    const int threads = int(std::min<int64_t>(num_threads, std::max<int64_t>(blocks, 1)));
    const int64_t per = ((blocks + threads - 1) / threads * 6 * 128 +
                         (kind == fastclip::GemmInput::Float32 ? 0 : 128 * 64)) * 4;
    const ScratchUse use(per, threads);
    py::gil_scoped_release release;
    fastclip::clipped_gemm(N, p, d, ap, lda, gp, ldg, kind, cp, T, o, d, num_threads);
  }
  return out;
}

bool set_blas_library(const std::string& path) { return fastclip::blas::load(path); }

}  // namespace

void bind_linear(py::module_& m) {
  m.def("linear_sq_norms", &linear_sq_norms, py::arg("activations"), py::arg("gradients"),
        py::arg("method") = "auto", py::arg("bias") = false, py::arg("num_threads") = 1,
        "Per-example squared weight (and bias) gradient norms of a linear layer.\n\n"
        "activations (B, d) or (B, T, d), gradients (B, p) or (B, T, p): float32/float64 arrays\n"
        "with non-negative strides and a contiguous last dim. Returns (w_sq (B,), b_sq (B,) or None)\n"
        "in the input dtype.");
  m.def("choose_linear_method", &choose_linear_method, py::arg("T"), py::arg("d"), py::arg("p"),
        "'product' for T <= 1, else the cheaper of 'ghost' and 'direct' by flop count.");
  m.def("clipped_gemm", &clipped_gemm, py::arg("activations"), py::arg("gradients"),
        py::arg("factors"), py::arg("T"), py::arg("kind") = "float32", py::arg("num_threads") = 1,
        py::arg("out") = py::none(),
        "The clipped sum of a linear map, sum_q (c[q // T] G[q])^T A[q] (p, d) float32, from\n"
        "activations A (N, d) and gradients G (N, p), rows of N / T examples of T positions each,\n"
        "and their float32 clip factors c (N / T,), by the AVX-512 kernel (csrc/gemm_avx512.h).\n"
        "kind: 'float32' (float32 arrays) or 'bfloat16' / 'float16' (int16 arrays of the raw\n"
        "bits), widened to float32 exactly. out: None, or a C-contiguous float32 (p, d) array to\n"
        "write the result into (returned). Raises ValueError where that kernel does not run\n"
        "(small_gemm_available()).");
  m.def("small_gemm_available", &fastclip::small_gemm_available,
        "Whether the AVX-512 GEMM kernels run here (csrc/gemm_avx512.h): an x86-64 build where\n"
        "isa() is avx512.");
  m.def("gemm_kernels_enabled", &fastclip::gemm_kernels_enabled,
        "Whether the float32 products with a BLAS or torch alternative (a linear layer's clipped\n"
        "sum, the norms' Gram and direct tiles) run on the AVX-512 kernels: they run here and are\n"
        "preferred (by default where the core issues 512-bit FMAs at full width, not on AMD Zen 4;\n"
        "FASTCLIP_GEMM_KERNELS=0|1 sets the default).");
  m.def("set_gemm_kernels", &fastclip::set_gemm_kernels, py::arg("enabled"),
        "Prefer (True) or bypass (False) the AVX-512 kernels where BLAS or torch could run the\n"
        "product instead; returns the previous setting. Between steps only.");
  m.def("set_blas_library", &set_blas_library, py::arg("path"),
        "Load OpenBLAS (scipy-openblas32 build, scipy_ symbol prefix) from path; False if unusable.");
  m.def("set_blas_enabled", &fastclip::blas::set_enabled, py::arg("enabled"),
        "Use (True) or bypass (False) the loaded BLAS; returns the previous setting.");
  m.def("blas_info", &fastclip::blas::info, "Which BLAS the kernels use.");
  m.def("parallel_backend", &fastclip::parallel_backend,
        "Threads the kernels' parallel loops run on: 'openmp' (torch's OpenMP team) or 'own'.");
  m.def("isa", &fastclip::isa_name,
        "Vector instructions the hand-vectorised kernels use: 'avx512', 'avx2' or 'portable'\n"
        "(detected once; FASTCLIP_ISA=portable|avx2 caps it).");
}

}  // namespace fastclip_py
