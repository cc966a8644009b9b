// Bindings of the embedding kernels (csrc/embedding.h). Token ids are checked here: an id outside
// [0, num_embeddings) is a ValueError naming the id and its position, never an out-of-bounds read.
#include "binding.h"

#include "../csrc/embedding.h"

namespace fastclip_py {
namespace {

using fastclip::IdView;

// int32/int64 (native byte order) ids of rank 1 (B,) or 2 (B, T) with usable strides.
py::array checked_ids(const py::object& obj) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error("ids must be a numpy.ndarray, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  auto& api = py::detail::npy_api::get();
  if (!api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<int64_t>().ptr()) &&
      !api.PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<int32_t>().ptr()))
    throw py::type_error("ids must be int64 or int32 (native byte order), got " + dtype_name(a));
  if (a.ndim() != 1 && a.ndim() != 2)
    throw py::value_error("ids must be 1-D (B,) or 2-D (B, T), got " + std::to_string(a.ndim()) + "-D");
  check_layout(a, "ids");
  return a;
}

template <class I>
IdView<I> id_view(const py::array& a) {
  const auto item = static_cast<int64_t>(sizeof(I));
  auto stride = [&](py::ssize_t k) { return a.shape(k) <= 1 ? int64_t(0) : int64_t(a.strides(k)) / item; };
  IdView<I> v;
  v.data = static_cast<const I*>(a.data());
  v.n0 = a.shape(0);
  v.s0 = stride(0);
  if (a.ndim() == 2) {
    v.n1 = a.shape(1);
    v.s1 = stride(1);
  } else {
    v.n1 = 1;
  }
  return v;
}

// ids (B,) goes with a 2-D (B, p) array, ids (B, T) with a 3-D (B, T, p) one.
void check_pair(const py::array& ids, const py::array& G, const std::string& name) {
  if (G.ndim() != ids.ndim() + 1)
    throw py::value_error(name + " must be " + (ids.ndim() == 1 ? "2-D (B, p) for 1-D ids" : "3-D (B, T, p) for 2-D ids") +
                          ", got " + std::to_string(G.ndim()) + "-D");
  if (ids.shape(0) != G.shape(0))
    throw py::value_error("batch sizes differ: ids " + std::to_string(ids.shape(0)) + " vs " + name +
                          " " + std::to_string(G.shape(0)));
  if (ids.ndim() == 2 && ids.shape(1) != G.shape(1))
    throw py::value_error("positions (T) differ: ids " + std::to_string(ids.shape(1)) + " vs " + name +
                          " " + std::to_string(G.shape(1)));
}

int64_t checked_padding(const py::object& padding_idx, int64_t num_embeddings) {
  if (padding_idx.is_none()) return -1;
  if (!py::isinstance<py::int_>(padding_idx) || py::isinstance<py::bool_>(padding_idx))
    throw py::type_error("padding_idx must be None or an int, got " + type_name(padding_idx));
  int overflow = 0;
  const long long pad = PyLong_AsLongLongAndOverflow(padding_idx.ptr(), &overflow);
  if (overflow != 0)
    throw py::value_error("padding_idx " + std::string(py::str(padding_idx)) + " does not fit int64");
  if (pad == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (pad < 0 || pad >= num_embeddings)
    throw py::value_error("padding_idx must be in [0, num_embeddings = " + std::to_string(num_embeddings) +
                          "), got " + std::to_string(pad));
  return pad;
}

template <class I>
void check_bounds(const py::array& ids, int64_t num_embeddings) {
  const IdView<I> v = id_view<I>(ids);
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = fastclip::find_bad_id<I>(v, num_embeddings);
  }
  if (bad < 0) return;
  const int64_t i = bad / v.n1, t = bad % v.n1;
  const std::string where = ids.ndim() == 2 ? "ids[" + std::to_string(i) + ", " + std::to_string(t) + "]"
                                            : "ids[" + std::to_string(i) + "]";
  throw py::value_error(where + " = " + std::to_string(v.at(i, t)) +
                        " is out of range: token ids must be in [0, num_embeddings = " +
                        std::to_string(num_embeddings) + ")");
}

void check_ids_in_range(const py::array& ids, int64_t num_embeddings) {
  if (ids.size() == 0) return;
  if (ids.dtype().itemsize() == 8)
    check_bounds<int64_t>(ids, num_embeddings);
  else
    check_bounds<int32_t>(ids, num_embeddings);
}

template <class T, class I>
py::array_t<T> run_norms(const py::array& ids, const py::array& G, int64_t pad, int num_threads) {
  const IdView<I> v = id_view<I>(ids);
  const View3<T> g = view_of<T>(G);
  py::array_t<T> out(g.n0);
  T* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    fastclip::embedding_sq_norms<T, I>(v, g, pad, o, num_threads);
  }
  return out;
}

py::array embedding_sq_norms(const py::object& ids_obj, const py::object& G_obj, int64_t num_embeddings,
                             const py::object& padding_idx, int num_threads) {
  const py::array ids = checked_ids(ids_obj);
  const py::array G = checked_array(G_obj, "gradients");
  check_pair(ids, G, "gradients");
  if (num_embeddings < 0)
    throw py::value_error("num_embeddings must be >= 0, got " + std::to_string(num_embeddings));
  const int64_t pad = checked_padding(padding_idx, num_embeddings);
  num_threads = checked_threads(num_threads);
  // Per thread the core sorts one example's T tokens; per call it reads B x T rows of p.
  const int64_t Bn = ids.shape(0), Tn = ids.ndim() == 2 ? ids.shape(1) : 1;
  check_scratch(checked_mul(Tn, 2, "one example's sorted tokens"), "one example's sorted tokens");
  check_flops(double(Bn) * double(Tn) * (double(G.shape(G.ndim() - 1)) + 64.0), "this embedding's norms");
  check_ids_in_range(ids, num_embeddings);
  const bool i64 = ids.dtype().itemsize() == 8;
  if (G.dtype().itemsize() == 4)
    return i64 ? run_norms<float, int64_t>(ids, G, pad, num_threads)
               : run_norms<float, int32_t>(ids, G, pad, num_threads);
  return i64 ? run_norms<double, int64_t>(ids, G, pad, num_threads)
             : run_norms<double, int32_t>(ids, G, pad, num_threads);
}

template <class T, class I>
py::array_t<T> run_cross(const py::array& ids, const py::array& Ge, const py::array& H, const py::array& Go,
                         int64_t pad, int num_threads) {
  const IdView<I> v = id_view<I>(ids);
  const View3<T> ge = view_of<T>(Ge), h = view_of<T>(H), go = view_of<T>(Go);
  py::array_t<T> out(ge.n0);
  T* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    fastclip::embedding_linear_cross<T, I>(v, ge, h, go, pad, o, num_threads);
  }
  return out;
}

py::array embedding_linear_cross(const py::object& ids_obj, const py::object& Ge_obj, const py::object& H_obj,
                                 const py::object& Go_obj, const py::object& padding_idx, int num_threads) {
  const py::array ids = checked_ids(ids_obj);
  const py::array Ge = checked_array(Ge_obj, "embedding gradients");
  const py::array H = checked_array(H_obj, "activations");
  const py::array Go = checked_array(Go_obj, "output gradients");
  check_pair(ids, Ge, "embedding gradients");
  const auto item = Ge.dtype().itemsize();
  if (H.dtype().itemsize() != item || Go.dtype().itemsize() != item)
    throw py::type_error("dtypes differ: embedding gradients " + dtype_name(Ge) + ", activations " +
                         dtype_name(H) + ", output gradients " + dtype_name(Go));
  if (H.ndim() != Go.ndim())
    throw py::value_error("activations and output gradients ranks differ: " + std::to_string(H.ndim()) +
                          "-D vs " + std::to_string(Go.ndim()) + "-D");
  if (H.shape(0) != Ge.shape(0) || Go.shape(0) != Ge.shape(0))
    throw py::value_error("batch sizes differ: embedding gradients " + std::to_string(Ge.shape(0)) +
                          ", activations " + std::to_string(H.shape(0)) + ", output gradients " +
                          std::to_string(Go.shape(0)));
  if (H.ndim() == 3 && H.shape(1) != Go.shape(1))
    throw py::value_error("positions (T) differ: activations " + std::to_string(H.shape(1)) +
                          " vs output gradients " + std::to_string(Go.shape(1)));
  const auto d = Ge.shape(Ge.ndim() - 1);
  if (H.shape(H.ndim() - 1) != d)
    throw py::value_error("widths differ: embedding gradients have d = " + std::to_string(d) +
                          ", activations d = " + std::to_string(H.shape(H.ndim() - 1)));
  const int64_t V = Go.shape(Go.ndim() - 1);
  const int64_t pad = checked_padding(padding_idx, V);
  num_threads = checked_threads(num_threads);
  // Per thread: one example's Te x d embedding gradient and a Te x 256 block of E H^T; per call
  // a Te x To x d product per example.
  const int64_t Bn = ids.shape(0), Te = ids.ndim() == 2 ? ids.shape(1) : 1;
  const int64_t To = H.ndim() == 3 ? H.shape(1) : 1;
  check_scratch(checked_mul(Te, d, "embedding gradient tokens x width"),
                 "one example's embedding gradient (" + std::to_string(Te) + " x " + std::to_string(d) + ")");
  check_scratch(checked_mul(Te, std::min<int64_t>(To, 256), "cross block"), "one example's cross block");
  check_flops(double(Bn) * double(Te) * (double(To) * double(d) + double(V) + 64.0),
              "this tied embedding's cross terms");
  check_ids_in_range(ids, V);
  const bool i64 = ids.dtype().itemsize() == 8;
  if (item == 4)
    return i64 ? run_cross<float, int64_t>(ids, Ge, H, Go, pad, num_threads)
               : run_cross<float, int32_t>(ids, Ge, H, Go, pad, num_threads);
  return i64 ? run_cross<double, int64_t>(ids, Ge, H, Go, pad, num_threads)
             : run_cross<double, int32_t>(ids, Ge, H, Go, pad, num_threads);
}

}  // namespace

void bind_embedding(py::module_& m) {
  m.def("embedding_sq_norms", &embedding_sq_norms, py::arg("ids"), py::arg("gradients"),
        py::arg("num_embeddings"), py::arg("padding_idx") = py::none(), py::arg("num_threads") = 1,
        "Per-example squared weight-gradient norms of an embedding (unique-token method).\n\n"
        "ids (B,) or (B, T) int64/int32 in [0, num_embeddings); gradients (B, p) or (B, T, p)\n"
        "float32/float64 with a contiguous last dim. Positions holding padding_idx contribute\n"
        "nothing. Returns (B,) in the gradients' dtype.");
  m.def("embedding_linear_cross", &embedding_linear_cross, py::arg("ids"), py::arg("embedding_gradients"),
        py::arg("activations"), py::arg("output_gradients"), py::arg("padding_idx") = py::none(),
        py::arg("num_threads") = 1,
        "Per-example <E_i, Go_i^T H_i> for a weight (V, d) tied between an embedding (ids (B, Te),\n"
        "embedding gradients (B, Te, d)) and an output projection (activations (B, To, d), output\n"
        "gradients (B, To, V)); 2-D forms (B,), (B, d), (B, d), (B, V) also accepted. Returns (B,).");
}

}  // namespace fastclip_py
