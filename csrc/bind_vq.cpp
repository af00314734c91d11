// Python bindings of the CPU fused VQ kernel (vq_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>

#include "bindings.h"
#include "buffers.h"
#include "vq_cpu.h"

namespace py = pybind11;
using lapo::checked_data;

namespace {

// The fused CPU VQ op takes numpy views of the caller's CPU tensors (Tensor.numpy(): no copy) and
// checks each one's dtype, contiguity and size against the codebook's (G, K, d) here, so a wrong
// argument is a Python exception naming it, never a write out of bounds. (numpy, not libtorch:
// the extension stays independent of the installed torch's C++ ABI.)
using OptArray = std::optional<py::array>;

template <typename T>
T* optional_data(const OptArray& arr, const char* what, py::ssize_t count) {
  return arr ? checked_data<T>(*arr, what, count) : nullptr;
}

struct Codebook {
  int G, K, d;
};

Codebook codebook_shape(const py::array& codebook) {
  if (codebook.ndim() != 3) throw py::value_error("vq: codebook must be (G, K, d), got " +
                                                  std::to_string(codebook.ndim()) + " dimensions");
  const Codebook c{static_cast<int>(codebook.shape(0)), static_cast<int>(codebook.shape(1)),
                   static_cast<int>(codebook.shape(2))};
  if (c.G < 1 || c.K < 1 || c.d < 1) throw py::value_error("vq: codebook needs G, K, d >= 1");
  return c;
}

py::tuple vq_forward(const py::array& x, const py::array& out, const py::array& indices, const py::array& codebook,
                     const OptArray& counts, const OptArray& sums, const OptArray& ema_count,
                     const OptArray& ema_weight, int64_t batch, int L, const std::array<int64_t, 4>& strides,
                     int num_threads, float decay, float rate, float eps) {
  const Codebook c = codebook_shape(codebook);
  if (batch < 0 || L < 1) throw py::value_error("vq: need batch >= 0 and L >= 1");
  if (num_threads < 1) throw py::value_error("vq: num_threads must be >= 1");
  if (!ema_count != !ema_weight) throw py::value_error("vq: give both ema_count and ema_weight, or neither");
  const py::ssize_t rows = static_cast<py::ssize_t>(batch) * c.G * L;
  const auto [sb, sg, sk, sl] = strides;
  const int64_t last = batch > 0 ? (batch - 1) * sb + (c.G - 1) * sg + (c.d - 1) * sk + (L - 1) * sl : -1;
  if (sb < 0 || sg < 0 || sk < 0 || sl < 0 || last >= static_cast<int64_t>(rows) * c.d)
    throw py::value_error("vq: the strides reach outside x");
  const lapo::vq::Problem p{checked_data<float>(x, "x", rows * c.d, false), checked_data<float>(out, "out", rows * c.d),
                            checked_data<int64_t>(indices, "indices", rows),
                            checked_data<float>(codebook, "codebook", -1, ema_count.has_value()),
                            batch, c.G, c.K, c.d, L, sb, sg, sk, sl};
  float* cnt = optional_data<float>(counts, "counts", static_cast<py::ssize_t>(c.G) * c.K);
  float* sum = optional_data<float>(sums, "sums", static_cast<py::ssize_t>(c.G) * c.K * c.d);
  const lapo::vq::EmaUpdate update{optional_data<float>(ema_count, "ema_count", static_cast<py::ssize_t>(c.G) * c.K),
                                   optional_data<float>(ema_weight, "ema_weight",
                                                        static_cast<py::ssize_t>(c.G) * c.K * c.d),
                                   const_cast<float*>(p.codebook), decay, rate, eps};
  lapo::vq::ForwardResult r;
  {
    py::gil_scoped_release release;
    r = lapo::vq::forward(p, cnt, sum, num_threads, ema_count ? &update : nullptr);
  }
  return py::make_tuple(r.sq_err, r.nonfinite, r.perplexity);
}

void vq_ema_update(const py::array& counts, const py::array& sums, const py::array& ema_count,
                   const py::array& ema_weight, const py::array& codebook, float decay, float rate, float eps) {
  const Codebook c = codebook_shape(codebook);
  const py::ssize_t codes = static_cast<py::ssize_t>(c.G) * c.K;
  const float* cnt = checked_data<float>(counts, "counts", codes, false);
  const float* sum = checked_data<float>(sums, "sums", codes * c.d, false);
  float* ec = checked_data<float>(ema_count, "ema_count", codes);
  float* ew = checked_data<float>(ema_weight, "ema_weight", codes * c.d);
  float* cb = checked_data<float>(codebook, "codebook", codes * c.d);
  py::gil_scoped_release release;
  lapo::vq::ema_update(c.G, c.K, c.d, cnt, sum, ec, ew, cb, decay, rate, eps);
}

}  // namespace

void lapo::bind_vq(py::module_& m) {
  // The fused CPU VQ kernel: numpy views of the tensors in (noconvert: an array of another dtype
  // is an error, never a silent copy that the kernel would write into), work without the GIL.
  m.def("vq_forward", &vq_forward, py::arg("x").noconvert(), py::arg("out").noconvert(),
        py::arg("indices").noconvert(), py::arg("codebook").noconvert(), py::arg("counts").noconvert(),
        py::arg("sums").noconvert(), py::arg("ema_count").noconvert(), py::arg("ema_weight").noconvert(),
        py::arg("batch"), py::arg("L"), py::arg("strides"), py::arg("num_threads"), py::arg("decay"),
        py::arg("rate"), py::arg("eps"),
        "Nearest-code search of x (float32, read through strides (b, g, k, l) in elements) in codebook "
        "(G, K, d), quantised output into out, indices (int64, (batch, G, L)), per-code counts and sums "
        "(into the given arrays, or internal ones where None), then the EMA update when ema_count and "
        "ema_weight are given. Returns (sum of squared errors, values that are NaN/inf, perplexity); "
        "nothing is updated and counts/sums are left unwritten when a value is not finite.");
  m.def("vq_cpu_kernel", [] { return lapo::vq::has_avx2() ? "avx2" : "portable"; },
        "Which CPU search kernel this machine runs.");
  m.def("vq_ema_update", &vq_ema_update, py::arg("counts").noconvert(), py::arg("sums").noconvert(),
        py::arg("ema_count").noconvert(), py::arg("ema_weight").noconvert(), py::arg("codebook").noconvert(),
        py::arg("decay"), py::arg("rate"), py::arg("eps"),
        "EMA codebook update with LAPO's semantics, in place: counts (G, K) and sums (G, K, d) of a batch "
        "into ema_count, ema_weight and codebook (G, K, d); rate is 1 - decay.");
}
