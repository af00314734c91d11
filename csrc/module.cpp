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

// One fused-VQ call, described by name from Python (lapo_fast.ops.vq fills it): the addresses are
// data_ptr()s of contiguous float32 / int64 CPU tensors that the caller has checked; 0 = absent.
struct VQCall {
  uintptr_t x = 0, out = 0, indices = 0, codebook = 0;  // required
  uintptr_t counts = 0, sums = 0;                       // optional outputs (internal buffers if 0)
  uintptr_t ema_count = 0, ema_weight = 0;              // both or neither: the EMA update to apply
  int64_t batch = 0;
  int G = 0, K = 0, d = 0, L = 0;
  int64_t stride_b = 0, stride_g = 0, stride_k = 0, stride_l = 0;
  int num_threads = 1;
  float decay = 0.f, rate = 0.f, eps = 0.f;  // rate: 1 - decay computed in double by the caller
};

py::tuple vq_forward(const VQCall& c) {
  if (c.batch < 0 || c.G < 1 || c.K < 1 || c.d < 1 || c.L < 1)
    throw py::value_error("vq: need batch >= 0 and G, K, d, L >= 1");
  if (c.num_threads < 1) throw py::value_error("vq: num_threads must be >= 1");
  if (!c.ema_count != !c.ema_weight) throw py::value_error("vq: give both ema_count and ema_weight, or neither");
  const lapo::vq::Problem p{ptr<const float>(c.x, "x"), ptr<float>(c.out, "out"),
                            ptr<int64_t>(c.indices, "indices"), ptr<const float>(c.codebook, "codebook"),
                            c.batch, c.G, c.K, c.d, c.L, c.stride_b, c.stride_g, c.stride_k, c.stride_l};
  const lapo::vq::EmaUpdate update{reinterpret_cast<float*>(c.ema_count), reinterpret_cast<float*>(c.ema_weight),
                                   ptr<float>(c.codebook, "codebook"), c.decay, c.rate, c.eps};
  lapo::vq::ForwardResult r;
  {
    py::gil_scoped_release release;
    r = lapo::vq::forward(p, reinterpret_cast<float*>(c.counts), reinterpret_cast<float*>(c.sums), c.num_threads,
                          c.ema_count ? &update : nullptr);
  }
  return py::make_tuple(r.sq_err, r.nonfinite, r.perplexity);
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

  // The fused CPU VQ kernel: one VQCall in, work without the GIL.
  py::class_<VQCall>(m, "VQCall", "The arguments of one vq_forward call, by name (addresses: 0 = absent).")
      .def(py::init<>())
      .def_readwrite("x", &VQCall::x)
      .def_readwrite("out", &VQCall::out)
      .def_readwrite("indices", &VQCall::indices)
      .def_readwrite("codebook", &VQCall::codebook)
      .def_readwrite("counts", &VQCall::counts)
      .def_readwrite("sums", &VQCall::sums)
      .def_readwrite("ema_count", &VQCall::ema_count)
      .def_readwrite("ema_weight", &VQCall::ema_weight)
      .def_readwrite("batch", &VQCall::batch)
      .def_readwrite("G", &VQCall::G)
      .def_readwrite("K", &VQCall::K)
      .def_readwrite("d", &VQCall::d)
      .def_readwrite("L", &VQCall::L)
      .def_readwrite("stride_b", &VQCall::stride_b)
      .def_readwrite("stride_g", &VQCall::stride_g)
      .def_readwrite("stride_k", &VQCall::stride_k)
      .def_readwrite("stride_l", &VQCall::stride_l)
      .def_readwrite("num_threads", &VQCall::num_threads)
      .def_readwrite("decay", &VQCall::decay)
      .def_readwrite("rate", &VQCall::rate)
      .def_readwrite("eps", &VQCall::eps);
  m.def("vq_forward", &vq_forward, py::arg("call"),
        "Nearest-code search, quantised output, indices, per-code counts and sums (into the given "
        "buffers, or internal ones where 0), then the EMA update when ema_count/ema_weight are given. "
        "Returns (sum of squared errors, values that are NaN/inf, perplexity); nothing is updated "
        "and counts/sums are left unwritten when a value is not finite.");
  m.def("vq_cpu_kernel", [] { return lapo::vq::has_avx2() ? "avx2" : "portable"; },
        "Which CPU search kernel this machine runs.");
  m.def(
      "vq_ema_update",
      [](const VQCall& c) {
        if (c.G < 1 || c.K < 1 || c.d < 1) throw py::value_error("vq: need G, K, d >= 1");
        auto counts = ptr<const float>(c.counts, "counts");
        auto sums = ptr<const float>(c.sums, "sums");
        auto ema_count = ptr<float>(c.ema_count, "ema_count");
        auto ema_weight = ptr<float>(c.ema_weight, "ema_weight");
        auto codebook = ptr<float>(c.codebook, "codebook");
        py::gil_scoped_release release;
        lapo::vq::ema_update(c.G, c.K, c.d, counts, sums, ema_count, ema_weight, codebook, c.decay, c.rate, c.eps);
      },
      py::arg("call"),
      "EMA codebook update with LAPO's semantics, in place, from a VQCall's counts, sums, ema_count, "
      "ema_weight, codebook, G, K, d, decay, rate (1 - decay) and eps.");
}
