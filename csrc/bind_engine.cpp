// Python bindings of the batched Procgen engine (procgen_engine.h): numpy buffers in, work
// without the GIL, errors as Python exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "buffers.h"
#include "procgen_engine.h"

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

}  // namespace

void lapo::bind_engine(py::module_& m) {
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
}
