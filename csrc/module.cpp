// lapo_fast._C: the batched Procgen engine and the CPU fused VQ kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "buffers.h"
#include "procgen_engine.h"
#include "vq_cpu.h"

namespace py = pybind11;
using lapo::checked_data;

namespace {

// Holds the engine and the numpy buffers it writes into, so they outlive it.
class PyProcgenEngine {
 public:
  PyProcgenEngine(const std::string& lib_path, const std::vector<std::string>& games,
                  const std::vector<int>& sizes, const std::vector<int32_t>& seeds,
                  const lapo::OptionList& options, int num_threads, py::dict buffers)
      : buffers_(buffers) {
    if (games.size() != sizes.size() || games.size() != seeds.size())
      throw py::value_error("games, sizes and seeds must have one entry per instance");
    std::vector<lapo::InstanceSpec> specs;
    py::ssize_t n = 0;
    for (size_t i = 0; i < games.size(); ++i) {
      specs.push_back({games[i], sizes[i], seeds[i]});
      n += sizes[i];
    }
    auto get = [&](const char* key) -> py::array {
      if (!buffers.contains(key)) throw py::key_error(std::string("missing buffer ") + key);
      return buffers[key].cast<py::array>();
    };
    lapo::StepBuffers b{
        checked_data<uint8_t>(get("obs"), "obs", n * lapo::ProcgenEngine::kObsBytes),
        checked_data<float>(get("reward"), "reward", n),
        checked_data<uint8_t>(get("first"), "first", n),
        checked_data<int32_t>(get("actions"), "actions", n),
        checked_data<float>(get("episode_return"), "episode_return", n),
        checked_data<int32_t>(get("episode_length"), "episode_length", n),
        checked_data<float>(get("final_return"), "final_return", n),
        checked_data<int32_t>(get("final_length"), "final_length", n),
    };
    py::gil_scoped_release release;
    engine_ = std::make_unique<lapo::ProcgenEngine>(lib_path, specs, options, num_threads, b);
  }

  void step(py::object record_obs) {
    uint8_t* record = nullptr;
    if (!record_obs.is_none()) {
      record = checked_data<uint8_t>(record_obs.cast<py::array>(), "record_obs",
                                     static_cast<py::ssize_t>(engine_->num_envs()) *
                                         lapo::ProcgenEngine::kObsBytes);
    }
    py::gil_scoped_release release;
    engine_->step(record);
  }

  void force_reset() {
    py::gil_scoped_release release;
    engine_->force_reset();
  }

  py::dict info() const {
    py::dict out;
    const auto& names = engine_->info_names();
    for (size_t k = 0; k < names.size(); ++k) {
      py::array_t<int32_t> arr(engine_->num_envs());
      engine_->copy_info(static_cast<int>(k), arr.mutable_data());
      out[py::str(names[k])] = arr;
    }
    return out;
  }

  void close() {
    py::gil_scoped_release release;
    engine_->close();
  }

  int num_envs() const { return engine_->num_envs(); }
  int num_threads() const { return engine_->num_threads(); }
  bool closed() const { return engine_->closed(); }

 private:
  py::dict buffers_;
  std::unique_ptr<lapo::ProcgenEngine> engine_;
};

template <typename T>
T* ptr(uintptr_t address, const char* what) {
  if (!address) throw py::value_error(std::string(what) + " is a null pointer");
  return reinterpret_cast<T*>(address);
}

lapo::vq::Problem vq_problem(uintptr_t x, uintptr_t out, uintptr_t indices, uintptr_t codebook,
                             int64_t batch, int G, int K, int d, int L, int64_t stride_b,
                             int64_t stride_g, int64_t stride_k, int64_t stride_l) {
  if (batch < 0 || G < 1 || K < 1 || d < 1 || L < 1)
    throw py::value_error("vq: need batch >= 0 and G, K, d, L >= 1");
  return {ptr<const float>(x, "x"), ptr<float>(out, "out"), ptr<int64_t>(indices, "indices"),
          ptr<const float>(codebook, "codebook"), batch, G, K, d, L,
          stride_b, stride_g, stride_k, stride_l};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lapo_fast native extension: batched Procgen engine and CPU fused VQ kernel";

  py::class_<PyProcgenEngine>(m, "ProcgenEngine")
      .def(py::init<const std::string&, const std::vector<std::string>&, const std::vector<int>&,
                    const std::vector<int32_t>&, const lapo::OptionList&, int, py::dict>(),
           py::arg("lib_path"), py::arg("games"), py::arg("sizes"), py::arg("seeds"),
           py::arg("options"), py::arg("num_threads"), py::arg("buffers"))
      .def("step", &PyProcgenEngine::step, py::arg("record_obs") = py::none())
      .def("force_reset", &PyProcgenEngine::force_reset)
      .def("info", &PyProcgenEngine::info)
      .def("close", &PyProcgenEngine::close)
      .def_property_readonly("num_envs", &PyProcgenEngine::num_envs)
      .def_property_readonly("num_threads", &PyProcgenEngine::num_threads)
      .def_property_readonly("closed", &PyProcgenEngine::closed);

  // The fused CPU VQ kernel. Pointers are data_ptr()s of contiguous float32 / int64 CPU tensors
  // that the caller (lapo_fast.ops.vq) has checked; work runs without the GIL.
  m.def(
      "vq_forward",
      [](uintptr_t x, uintptr_t out, uintptr_t indices, uintptr_t codebook, uintptr_t counts,
         uintptr_t sums, int64_t batch, int G, int K, int d, int L, int64_t stride_b,
         int64_t stride_g, int64_t stride_k, int64_t stride_l, int num_threads,
         uintptr_t ema_count, uintptr_t ema_weight, float decay, float eps) {
        auto p = vq_problem(x, out, indices, codebook, batch, G, K, d, L, stride_b, stride_g,
                            stride_k, stride_l);
        if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
        if (!ema_count != !ema_weight) throw py::value_error("vq: give both ema_count and ema_weight, or neither");
        lapo::vq::EmaUpdate update{reinterpret_cast<float*>(ema_count), reinterpret_cast<float*>(ema_weight),
                                   ptr<float>(codebook, "codebook"), decay, eps};
        lapo::vq::ForwardResult r;
        {
          py::gil_scoped_release release;
          r = lapo::vq::forward(p, reinterpret_cast<float*>(counts), reinterpret_cast<float*>(sums),
                                num_threads, ema_count ? &update : nullptr);
        }
        return py::make_tuple(r.sq_err, r.nonfinite, r.perplexity);
      },
      "Nearest-code search, quantised output, indices, per-code counts and sums (into the given "
      "buffers, or internal ones where 0), then the EMA update when ema_count/ema_weight are given. "
      "Returns (sum of squared errors, values that are NaN/inf, perplexity); nothing is updated "
      "and counts/sums are left unwritten when a value is not finite.",
      py::arg("x"), py::arg("out"), py::arg("indices"), py::arg("codebook"), py::arg("counts"),
      py::arg("sums"), py::arg("batch"), py::arg("G"), py::arg("K"), py::arg("d"), py::arg("L"),
      py::arg("stride_b"), py::arg("stride_g"), py::arg("stride_k"), py::arg("stride_l"),
      py::arg("num_threads"), py::arg("ema_count") = 0, py::arg("ema_weight") = 0,
      py::arg("decay") = 0.f, py::arg("eps") = 0.f);
  m.def("vq_cpu_kernel", [] { return lapo::vq::has_avx2() ? "avx2" : "portable"; },
        "Which CPU search kernel this machine runs.");
  m.def(
      "vq_ema_update",
      [](uintptr_t counts, uintptr_t sums, uintptr_t ema_count, uintptr_t ema_weight,
         uintptr_t codebook, int G, int K, int d, float decay, float eps) {
        if (G < 1 || K < 1 || d < 1) throw py::value_error("vq: need G, K, d >= 1");
        auto c = ptr<const float>(counts, "counts");
        auto s = ptr<const float>(sums, "sums");
        auto ec = ptr<float>(ema_count, "ema_count");
        auto ew = ptr<float>(ema_weight, "ema_weight");
        auto cb = ptr<float>(codebook, "codebook");
        py::gil_scoped_release release;
        lapo::vq::ema_update(G, K, d, c, s, ec, ew, cb, decay, eps);
      },
      "EMA codebook update with LAPO's semantics, in place.");
}
