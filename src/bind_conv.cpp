// Bindings of the convolution kernels: every argument is checked here, with its value in the
// message, before the core sees it.
#include <pybind11/stl.h>

#include <vector>

#include "binding.h"
#include "scratch.h"

#include "../csrc/conv.h"
#include "../csrc/conv_direct.h"

namespace fastclip_py {
namespace {

// A Python int as int64; one that does not fit is a ValueError with its value (pybind's own cast
// would raise a RuntimeError without it).
int64_t int64_of(const py::handle& item, const std::string& name) {
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(item.ptr(), &overflow);
  if (overflow != 0)
    throw py::value_error(name + " entry " + std::string(py::str(item)) + " does not fit int64");
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<int64_t>(v);
}

// A list/tuple of Python ints (bools refused) of one of the allowed lengths.
std::vector<int64_t> int_list(const py::handle& obj, const std::string& name, size_t n, size_t n_alt = 0) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    throw py::type_error(name + " must be a list or tuple of ints, got " + type_name(obj));
  auto seq = py::reinterpret_borrow<py::sequence>(obj);
  std::vector<int64_t> out;
  for (const auto& item : seq) {
    if (!py::isinstance<py::int_>(item) || py::isinstance<py::bool_>(item))
      throw py::type_error(name + " must hold ints, got " + type_name(item));
    out.push_back(int64_of(item, name));
  }
  if (out.size() != n && (n_alt == 0 || out.size() != n_alt)) {
    std::string want = std::to_string(n) + (n_alt ? " or " + std::to_string(n_alt) : "");
    throw py::value_error(name + " must have " + want + " entries for a " + std::to_string(n) +
                          "-D convolution, got " + std::to_string(out.size()));
  }
  return out;
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// float32/float64, rank 3..5, non-negative strides that are whole elements, aligned.
py::array conv_array(const py::object& obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be a numpy.ndarray, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  auto& api = py::detail::npy_api::get();
  if (!api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<float>().ptr()) &&
      !api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<double>().ptr()))
    throw py::type_error(name + " must be float32 or float64 (native byte order), got " + dtype_name(a));
  if (a.ndim() < 3 || a.ndim() > 5)
    throw py::value_error(name + " must be 3-D, 4-D or 5-D (B, C, *spatial), got " +
                          std::to_string(a.ndim()) + "-D with shape " + shape_str(a));
  check_layout(a, name);
  return a;
}

int64_t elem_stride(const py::array& a, py::ssize_t k) {
  return a.shape(k) <= 1 ? 0 : int64_t(a.strides(k)) / int64_t(a.dtype().itemsize());
}

std::string dims3(const int64_t* v) {
  return "(" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + ", " + std::to_string(v[2]) + ")";
}

// The core's arithmetic on the sizes, done here first with overflow checks: the output-size check
// (in + pads - dil (k - 1) - 1), the unfold height K = C/groups * prod(kernel), the positions P,
// the work items B * groups, and each per-thread buffer (K x P or K x tile unfold, Og x K direct
// product). A wrapped product would pass the core's checks and the unfold would write past its
// buffer; a huge one would be an allocation failure or hours of work instead of a ValueError.
// Returns the per-thread scratch in elements.
int64_t check_conv_sizes(const fastclip::ConvShape& s, fastclip::ConvMethod method) {
  for (int j = 0; j < 3; ++j) {
    if (s.k[j] < 1) throw py::value_error("kernel sizes must be >= 1, got " + dims3(s.k));
    if (s.stride[j] < 1) throw py::value_error("strides must be >= 1, got " + dims3(s.stride));
    if (s.dil[j] < 1) throw py::value_error("dilations must be >= 1, got " + dims3(s.dil));
    if (s.pad_lo[j] < 0 || s.pad_hi[j] < 0)
      throw py::value_error("paddings must be >= 0, got " + dims3(s.pad_lo) + " before and " +
                            dims3(s.pad_hi) + " after");
    checked_mul(s.dil[j], s.k[j] - 1, "dilation x (kernel size - 1)");
    checked_add(checked_add(s.in[j], s.pad_lo[j], "input size + padding"), s.pad_hi[j],
                "input size + padding");
    // The unfold rounds (padding + stride - 1) / stride to find the first output reading data.
    checked_add(s.pad_lo[j], s.stride[j], "padding + stride");
  }
  if (s.groups > std::max<int64_t>({s.C, s.O, 1}))
    throw py::value_error("groups (" + std::to_string(s.groups) + ") exceeds the channel counts (C_in " +
                          std::to_string(s.C) + ", C_out " + std::to_string(s.O) + ")");
  const int64_t K = checked_prod({s.C / s.groups, s.k[0], s.k[1], s.k[2]},
                                 "unfold height C_in/groups x kernel");
  const int64_t P = checked_prod({s.out[0], s.out[1], s.out[2]}, "output positions");
  const int64_t Og = s.O / s.groups;
  checked_mul(s.B, s.groups, "work items batch x groups");
  // Per-thread scratch, as csrc/conv.cpp sizes it (kConvTile, kConvUnfoldBudget, conv.h): ghost
  // holds the whole K x P unfold when it fits the budget, else two K x tile blocks; direct holds a
  // K x P (or K x chunk) unfold and one or two Og x K products; both a segment list of at most
  // kConvUnfoldLines entries (32 bytes each, counted here as float elements).
  const int64_t KP = checked_mul(K, P, "unfold K x positions");
  const int64_t KOg = checked_mul(K, Og, "direct product Og x K");
  constexpr int64_t tile = fastclip::kConvTile, budget = fastclip::kConvUnfoldBudget;
  const int64_t Ktile = checked_mul(K, 2 * tile, "unfold K x tile");
  if (method == fastclip::ConvMethod::Auto) method = fastclip::choose_conv_method(P, K, Og);
  int64_t scratch = 0;
  if (P > 0 && K > 0 && Og > 0) {
    // The zero-padded input of one group (the ghost Gram path's and the direct kernel's).
    const int64_t Pin = checked_prod({s.in[0] + s.pad_lo[0] + s.pad_hi[0],
                                      s.in[1] + s.pad_lo[1] + s.pad_hi[1],
                                      s.in[2] + s.pad_lo[2] + s.pad_hi[2]}, "padded input positions");
    const int64_t CgPin = checked_mul(s.C / s.groups, Pin, "padded input of a group");
    if (method == fastclip::ConvMethod::Ghost) {
      // The unfold (or its tiles), or the padded input of the stride-1 Gram path (taken only
      // when it fits the budget), + the Gram buffer of that path and the two Gram tiles.
      scratch = std::max(KP <= budget ? KP : Ktile, std::min(CgPin, budget)) +
                fastclip::kConvGramMax * fastclip::kConvGramMax + 2 * tile * tile;
    } else {
      const int64_t chunk = std::max<int64_t>(tile, budget / K);
      scratch = checked_add(P <= chunk ? KP : checked_mul(K, chunk, "unfold K x chunk"),
                            checked_mul(KOg, P <= chunk ? 1 : 2, "direct products"), "direct scratch");
      // The float32 AVX-512 kernel (conv_direct.h) holds instead the padded input, G transposed
      // to 16-column rows, the product and K row offsets (int64: two elements each); both
      // fit kConvUnfoldBudget when it runs. Counted for either dtype: an upper bound.
      if (fastclip::conv_direct_fused_available() && fastclip::conv_direct_fused_fits(s, Og)) {
        const int64_t fused = CgPin + P * ((Og + 15) / 16 * 16) + KOg + 2 * K;
        scratch = std::max(scratch, fused);
      }
    }
    scratch = checked_add(scratch, fastclip::kConvUnfoldLines * 32 / 4, "unfold segments");
  }
  check_scratch(scratch, "the per-thread scratch of one example (K = C_in/groups x kernel = " +
                              std::to_string(K) + ", C_out/groups = " + std::to_string(Og) +
                              ", positions = " + std::to_string(P) + ")");
  const double items = double(s.B) * double(s.groups);
  const double per = method == fastclip::ConvMethod::Direct
                         ? 2.0 * double(P) * double(K) * double(Og)
                         : (double(K) + double(Og) + 1.0) * double(P) * (double(P) + double(tile));
  check_flops(items * (per + 4.0 * double(K) * double(P)), "this convolution's norms");
  return scratch;
}

template <class T>
py::tuple run_conv(const fastclip::ConvShape& s, const py::array& x, const py::array& g,
                   fastclip::ConvMethod method, bool bias, int num_threads, T* pe_ptr,
                   T* gb_ptr, int64_t scratch) {
  py::array_t<T> w(s.B);
  py::object b = py::none();
  T* b_ptr = nullptr;
  if (bias) {
    py::array_t<T> bb(s.B);
    b_ptr = bb.mutable_data();
    b = bb;
  }
  T* w_ptr = w.mutable_data();
  const T* xp = static_cast<const T*>(x.data());
  const T* gp = static_cast<const T*>(g.data());
  {
    // The core's buffers: per thread `scratch` elements; per call two per-item partial sums.
    const ScratchUse use(checked_mul(scratch, int64_t(sizeof(T)), "scratch bytes"),
                         std::min<int64_t>(num_threads, s.B * s.groups), 2 * s.B * s.groups * 8);
    py::gil_scoped_release release;
    fastclip::conv_sq_norms<T>(s, xp, gp, method, w_ptr, b_ptr, num_threads, pe_ptr, gb_ptr);
  }
  return py::make_tuple(w, b);
}

py::tuple conv_sq_norms(const py::object& x_obj, const py::object& g_obj, const py::object& kernel_obj,
                        const py::object& stride_obj, const py::object& padding_obj,
                        const py::object& dilation_obj, const py::object& groups_obj,
                        const std::string& method_name, bool bias, int num_threads,
                        const py::object& pe_obj, const py::object& gb_obj) {
  const auto method = fastclip::parse_conv_method(method_name);
  const py::array x = conv_array(x_obj, "input");
  const py::array g = conv_array(g_obj, "grad_output");
  if (x.dtype().itemsize() != g.dtype().itemsize())
    throw py::type_error("input and grad_output dtypes differ: " + dtype_name(x) + " vs " + dtype_name(g));
  if (x.ndim() != g.ndim())
    throw py::value_error("input and grad_output ranks differ: " + std::to_string(x.ndim()) + "-D " +
                          shape_str(x) + " vs " + std::to_string(g.ndim()) + "-D " + shape_str(g));
  if (x.shape(0) != g.shape(0))
    throw py::value_error("batch sizes differ: " + std::to_string(x.shape(0)) + " vs " +
                          std::to_string(g.shape(0)));
  const size_t d = size_t(x.ndim() - 2);
  const auto kernel = int_list(kernel_obj, "kernel_size", d);
  const auto stride = int_list(stride_obj, "stride", d);
  const auto padding = int_list(padding_obj, "padding", d, 2 * d);
  const auto dilation = int_list(dilation_obj, "dilation", d);
  if (!py::isinstance<py::int_>(groups_obj) || py::isinstance<py::bool_>(groups_obj))
    throw py::type_error("groups must be an int, got " + type_name(groups_obj));
  const int64_t groups = int64_of(groups_obj, "groups");
  if (groups < 1) throw py::value_error("groups must be >= 1, got " + std::to_string(groups));

  fastclip::ConvShape s;
  s.B = x.shape(0);
  s.C = x.shape(1);
  s.O = g.shape(1);
  s.groups = groups;
  const size_t off = 3 - d;  // 1-D/2-D convolutions fill the trailing dims of (D, H, W)
  for (size_t j = 0; j < d; ++j) {
    s.in[off + j] = x.shape(py::ssize_t(2 + j));
    s.out[off + j] = g.shape(py::ssize_t(2 + j));
    s.k[off + j] = kernel[j];
    s.stride[off + j] = stride[j];
    s.dil[off + j] = dilation[j];
    s.pad_lo[off + j] = padding.size() == d ? padding[j] : padding[2 * j];
    s.pad_hi[off + j] = padding.size() == d ? padding[j] : padding[2 * j + 1];
  }
  s.xs[0] = elem_stride(x, 0);
  s.xs[1] = elem_stride(x, 1);
  for (size_t j = 0; j < d; ++j) s.xs[2 + off + j] = elem_stride(x, py::ssize_t(2 + j));
  // G's positions of one (example, channel) must form one contiguous run.
  int64_t expect = 1;
  for (py::ssize_t k = g.ndim() - 1; k >= 2; --k) {
    if (g.shape(k) > 1 && g.size() > 0 && elem_stride(g, k) != expect)
      throw py::value_error("grad_output must be contiguous over its spatial dims (got stride " +
                            std::to_string(elem_stride(g, k)) + " on dim " + std::to_string(k) +
                            ", expected " + std::to_string(expect) + "); make it contiguous");
    expect *= g.shape(k);
  }
  s.gs0 = elem_stride(g, 0);
  s.gs1 = g.shape(1) <= 1 ? expect : elem_stride(g, 1);
  if (g.size() > 0 && g.shape(1) > 1 && s.gs1 < expect)
    throw py::value_error("grad_output channel stride " + std::to_string(s.gs1) +
                          " overlaps its spatial block of " + std::to_string(expect) + " elements");
  const int64_t scratch = check_conv_sizes(s, method);
  fastclip::check_conv_shape(s);  // ArgumentError -> ValueError, with the values
  num_threads = checked_threads(num_threads);
  void* pe_ptr = nullptr;
  if (!pe_obj.is_none()) {
    // The direct method's per-example gradients, kept for the clipped sum: written in place, so
    // the array must be exactly (B, groups, K, C_out/groups) C-contiguous, writeable, of the
    // input's dtype: per example and group the K x Og transpose of that group's weight rows.
    const int64_t K = (s.C / s.groups) * s.k[0] * s.k[1] * s.k[2];
    const fastclip::ConvMethod resolved =
        method == fastclip::ConvMethod::Auto ? fastclip::choose_conv_method(s.positions(), K, s.O / s.groups)
                                             : method;
    if (resolved != fastclip::ConvMethod::Direct)
      throw py::value_error(std::string("per_example needs the direct method, got '") +
                            fastclip::conv_method_name(resolved) + "'");
    if (!py::isinstance<py::array>(pe_obj))
      throw py::type_error("per_example must be an array or None, got " + type_name(pe_obj));
    py::array pe = py::reinterpret_borrow<py::array>(pe_obj);
    if (!pe.dtype().is(x.dtype()))
      throw py::type_error("per_example dtype " + dtype_name(pe) + " differs from input's " + dtype_name(x));
    const int64_t Og = s.O / s.groups;
    if (pe.ndim() != 4 || pe.shape(0) != s.B || pe.shape(1) != s.groups || pe.shape(2) != K ||
        pe.shape(3) != Og)
      throw py::value_error("per_example must be (B, groups, K, C_out/groups) = (" +
                            std::to_string(s.B) + ", " + std::to_string(s.groups) + ", " +
                            std::to_string(K) + ", " + std::to_string(Og) + "), got " + shape_str(pe));
    if (!(pe.flags() & py::array::c_style) || !pe.writeable())
      throw py::value_error("per_example must be C-contiguous and writeable");
    pe_ptr = pe.mutable_data();
  }
  void* gb_ptr = nullptr;
  if (!gb_obj.is_none()) {
    // The per-example bias gradients the bias norm forms anyway: (B, C_out) C-contiguous,
    // writeable, of the input's dtype; only with bias=True.
    if (!bias) throw py::value_error("bias_grads needs bias=True");
    if (!py::isinstance<py::array>(gb_obj))
      throw py::type_error("bias_grads must be an array or None, got " + type_name(gb_obj));
    py::array gb = py::reinterpret_borrow<py::array>(gb_obj);
    if (!gb.dtype().is(x.dtype()))
      throw py::type_error("bias_grads dtype " + dtype_name(gb) + " differs from input's " + dtype_name(x));
    if (gb.ndim() != 2 || gb.shape(0) != s.B || gb.shape(1) != s.O)
      throw py::value_error("bias_grads must be (B, C_out) = (" + std::to_string(s.B) + ", " +
                            std::to_string(s.O) + "), got " + shape_str(gb));
    if (!(gb.flags() & py::array::c_style) || !gb.writeable())
      throw py::value_error("bias_grads must be C-contiguous and writeable");
    gb_ptr = gb.mutable_data();
  }
  if (x.dtype().itemsize() == 4)
    return run_conv<float>(s, x, g, method, bias, num_threads, static_cast<float*>(pe_ptr),
                           static_cast<float*>(gb_ptr), scratch);
  return run_conv<double>(s, x, g, method, bias, num_threads, static_cast<double*>(pe_ptr),
                          static_cast<double*>(gb_ptr), scratch);
}

std::string choose_conv_method(int64_t P, int64_t K, int64_t Og) {
  if (P < 0 || K < 0 || Og < 0)
    throw py::value_error("sizes must be >= 0, got P=" + std::to_string(P) + ", K=" +
                          std::to_string(K) + ", Og=" + std::to_string(Og));
  checked_mul(K, Og, "direct product Og x K");  // the core compares K * Og with its memory cap
  return fastclip::conv_method_name(fastclip::choose_conv_method(P, K, Og));
}

}  // namespace

void bind_conv(py::module_& m) {
  m.def("conv_sq_norms", &conv_sq_norms, py::arg("input"), py::arg("grad_output"),
        py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("method") = "auto", py::arg("bias") = false,
        py::arg("num_threads") = 1, py::arg("per_example") = py::none(),
        py::arg("bias_grads") = py::none(),
        "Per-example squared weight (and bias) gradient norms of a 1-D/2-D/3-D convolution.\n\n"
        "input (B, C_in, *spatial) and grad_output (B, C_out, *out_spatial): float32/float64 arrays\n"
        "with non-negative strides; grad_output contiguous over its spatial dims. kernel_size,\n"
        "stride, dilation: d ints; padding: d ints (symmetric) or 2d ints (before, after per dim).\n"
        "per_example: None, or a (B, groups, K, C_out/groups) array (direct method only) that\n"
        "receives the per-example weight gradients, each group's transposed (K x C_out/groups,\n"
        "K = C_in/groups * prod(kernel)).\n"
        "bias_grads: None, or a (B, C_out) array (bias=True only) that receives the per-example\n"
        "bias gradients (sums over positions of grad_output).\n"
        "Returns (w_sq (B,), b_sq (B,) or None) in the input dtype.");
  m.def("choose_conv_method", &choose_conv_method, py::arg("P"), py::arg("K"), py::arg("Og"),
        "'ghost' or 'direct' for P output positions, K = C_in/groups * prod(kernel), Og = C_out/groups.");
  m.def("set_conv_direct_fused", &fastclip::set_conv_direct_fused, py::arg("enabled"),
        "Turn the float32 direct method's AVX-512 kernel (csrc/conv_direct.h) on or off for the\n"
        "process; returns the previous setting. Off: the unfold and BLAS path (tests compare both).");
  m.def("conv_direct_fused_available", &fastclip::conv_direct_fused_available,
        "Whether the float32 direct method runs the AVX-512 kernel that reads the padded input in\n"
        "place: an x86-64 build where fastclip._C.isa() is avx512, and not turned off by\n"
        "set_conv_direct_fused.");
}

}  // namespace fastclip_py
