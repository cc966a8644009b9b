// fastclip._C: where Python meets the C++ core. Every argument is validated in the bind_*.cpp
// files, with the actual values in the message (TypeError for wrong types/dtypes, ValueError for
// wrong shapes/strides); arrays are used in place, never copied, and the GIL is released around
// the compute.
#include "binding.h"
#include "scratch.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclip native core (C++17): per-example gradient norm kernels.";
  fastclip_py::bind_linear(m);
  fastclip_py::bind_noise(m);
  fastclip_py::bind_conv(m);
  fastclip_py::bind_embedding(m);
  fastclip_py::bind_norm(m);
  fastclip_py::bind_rnn(m);
  fastclip_py::bind_scratch(m);
}
