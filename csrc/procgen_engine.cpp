#include "procgen_engine.h"

#include <dlfcn.h>

#include <cstring>
#include <map>
#include <stdexcept>

namespace lapo {

namespace libenv {

int dtype_size(int dtype) {
  switch (dtype) {
    case kDtypeUint8: return 1;
    case kDtypeInt32: return 4;
    case kDtypeFloat32: return 4;
    default: throw std::runtime_error("libenv: unknown dtype " + std::to_string(dtype));
  }
}

const Api& load_api(const std::string& path) {
  // Kept for the life of the process: procgen's library owns global state (Qt, asset caches)
  // that is not safe to unload while any other libenv handle might still exist.
  static std::mutex mutex;
  static std::map<std::string, Api> loaded;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = loaded.find(path);
  if (found != loaded.end()) return found->second;

  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* err = dlerror();
    throw std::runtime_error("could not load procgen's libenv from " + path + ": " +
                             (err ? err : "unknown error") +
                             " (is procgen-mirror==0.10.7 installed?)");
  }
  auto sym = [&](const char* name) {
    void* p = dlsym(lib, name);
    if (!p) throw std::runtime_error(std::string("libenv at ") + path + " lacks symbol " + name);
    return p;
  };
  Api api;
  api.version = reinterpret_cast<int (*)()>(sym("libenv_version"));
  api.make = reinterpret_cast<Handle* (*)(int, const Options)>(sym("libenv_make"));
  api.get_tensortypes = reinterpret_cast<int (*)(Handle*, int, TensorType*)>(sym("libenv_get_tensortypes"));
  api.set_buffers = reinterpret_cast<void (*)(Handle*, Buffers*)>(sym("libenv_set_buffers"));
  api.observe = reinterpret_cast<void (*)(Handle*)>(sym("libenv_observe"));
  api.act = reinterpret_cast<void (*)(Handle*)>(sym("libenv_act"));
  api.close = reinterpret_cast<void (*)(Handle*)>(sym("libenv_close"));
  if (api.version() != kVersion) {
    throw std::runtime_error("libenv at " + path + " has ABI version " +
                             std::to_string(api.version()) + ", expected " +
                             std::to_string(kVersion));
  }
  return loaded.emplace(path, api).first->second;
}

}  // namespace libenv

namespace {

// Owns the storage behind a libenv_options array for the duration of libenv_make.
class OptionsBuilder {
 public:
  void add(const std::string& name, const OptionValue& value) {
    if (name.size() >= libenv::kMaxNameLen - 1) throw std::invalid_argument("option name too long: " + name);
    libenv::Option opt{};
    std::memcpy(opt.name, name.c_str(), name.size() + 1);
    auto& storage = storage_.emplace_back();
    if (auto b = std::get_if<bool>(&value)) {
      storage.assign(1, static_cast<char>(*b ? 1 : 0));
      opt.dtype = libenv::kDtypeUint8;
      opt.count = 1;
    } else if (auto i = std::get_if<int32_t>(&value)) {
      storage.resize(sizeof(int32_t));
      std::memcpy(storage.data(), i, sizeof(int32_t));
      opt.dtype = libenv::kDtypeInt32;
      opt.count = 1;
    } else {
      const auto& s = std::get<std::string>(value);
      storage.assign(s.begin(), s.end());
      storage.push_back('\0');
      opt.dtype = libenv::kDtypeUint8;
      opt.count = static_cast<int>(s.size());
    }
    items_.push_back(opt);
  }

  libenv::Options finish() {
    // storage_ is a vector of vectors; data() pointers stay valid once all are added.
    for (size_t i = 0; i < items_.size(); ++i) items_[i].data = storage_[i].data();
    return libenv::Options{items_.data(), static_cast<int>(items_.size())};
  }

 private:
  std::vector<std::vector<char>> storage_;
  std::vector<libenv::Option> items_;
};

std::vector<libenv::TensorType> tensortypes(const libenv::Api& api, libenv::Handle* h, int space) {
  int count = api.get_tensortypes(h, space, nullptr);
  std::vector<libenv::TensorType> types(count);
  if (count > 0) api.get_tensortypes(h, space, types.data());
  return types;
}

int num_elements(const libenv::TensorType& t) {
  int n = 1;
  for (int d = 0; d < t.ndim; ++d) n *= t.shape[d];
  return n;
}

}  // namespace

struct ProcgenEngine::Instance {
  const libenv::Api* api;
  libenv::Handle* handle = nullptr;
  int first_env = 0;
  int num_envs = 0;
  // Pointer arrays handed to set_buffers; libenv keeps reading them, so they live here.
  std::vector<void*> ob_ptrs, ac_ptrs, info_ptrs;

  Instance(const libenv::Api* a, libenv::Handle* h, int first, int n)
      : api(a), handle(h), first_env(first), num_envs(n) {}
  ~Instance() {
    if (handle) api->close(handle);
  }
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;
};

ProcgenEngine::ProcgenEngine(const std::string& lib_path, const std::vector<InstanceSpec>& specs,
                             const OptionList& common_options, int num_threads,
                             StepBuffers buffers)
    : api_(&libenv::load_api(lib_path)), buf_(buffers) {
  if (specs.empty()) throw std::invalid_argument("ProcgenEngine needs at least one instance");
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  for (const auto& s : specs) {
    if (s.num_envs < 1) throw std::invalid_argument("each instance needs at least one env");
    num_envs_ += s.num_envs;
  }
  // Make every instance before wiring any buffers, so a failure leaves nothing half set up.
  int first_env = 0;
  for (const auto& spec : specs) {
    OptionsBuilder opts;
    for (const auto& [name, value] : common_options) opts.add(name, value);
    opts.add("env_name", spec.game);
    opts.add("rand_seed", spec.rand_seed);
    opts.add("num_threads", int32_t{0});
    libenv::Handle* h = api_->make(spec.num_envs, opts.finish());
    if (!h) throw std::runtime_error("libenv_make failed for game " + spec.game);
    instances_.push_back(std::make_unique<Instance>(api_, h, first_env, spec.num_envs));
    first_env += spec.num_envs;
  }

  for (auto& inst : instances_) {
    auto ob = tensortypes(*api_, inst->handle, libenv::kSpaceObservation);
    auto ac = tensortypes(*api_, inst->handle, libenv::kSpaceAction);
    auto info = tensortypes(*api_, inst->handle, libenv::kSpaceInfo);
    if (ob.size() != 1 || ob[0].dtype != libenv::kDtypeUint8 || num_elements(ob[0]) != kObsBytes)
      throw std::runtime_error("unexpected procgen observation space (want one 64x64x3 uint8 'rgb')");
    if (ac.size() != 1 || ac[0].dtype != libenv::kDtypeInt32 || num_elements(ac[0]) != 1)
      throw std::runtime_error("unexpected procgen action space (want one int32 scalar)");
    if (info_names_.empty()) {
      for (const auto& t : info) {
        info_names_.emplace_back(t.name);
        info_dtypes_.push_back(t.dtype);
        info_.emplace_back(static_cast<size_t>(num_envs_) * libenv::dtype_size(t.dtype), 0);
      }
    }
    if (info.size() != info_names_.size())
      throw std::runtime_error("instances disagree on their info space");
    for (size_t k = 0; k < info.size(); ++k) {
      if (info_names_[k] != info[k].name || info[k].dtype != info_dtypes_[k] ||
          info[k].dtype == libenv::kDtypeFloat32 || num_elements(info[k]) != 1)
        throw std::runtime_error(std::string("unsupported procgen info entry ") + info[k].name);
    }

    const int n = inst->num_envs, base = inst->first_env;
    inst->ob_ptrs.resize(n);
    inst->ac_ptrs.resize(n);
    inst->info_ptrs.resize(info.size() * n);
    for (int i = 0; i < n; ++i) {
      inst->ob_ptrs[i] = buf_.obs + static_cast<size_t>(base + i) * kObsBytes;
      inst->ac_ptrs[i] = buf_.actions + base + i;
      for (size_t k = 0; k < info.size(); ++k)
        inst->info_ptrs[k * n + i] = info_[k].data() + static_cast<size_t>(base + i) * libenv::dtype_size(info[k].dtype);
    }
    libenv::Buffers b{inst->ob_ptrs.data(), buf_.reward + base, buf_.first + base,
                      inst->info_ptrs.data(), inst->ac_ptrs.data()};
    api_->set_buffers(inst->handle, &b);
    api_->observe(inst->handle);
  }
  for (int i = 0; i < num_envs_; ++i) {
    buf_.episode_return[i] = 0.f;
    buf_.episode_length[i] = 0;
    buf_.final_return[i] = 0.f;
    buf_.final_length[i] = 0;
  }
  pool_ = std::make_unique<ThreadPool>(num_threads);
}

ProcgenEngine::~ProcgenEngine() { close(); }

void ProcgenEngine::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  instances_.clear();
}

void ProcgenEngine::check_open() const {
  if (instances_.empty()) throw std::runtime_error("this ProcgenVecEnv is closed");
}

void ProcgenEngine::check_actions() const {
  for (int i = 0; i < num_envs_; ++i) {
    int32_t a = buf_.actions[i];
    if (a < 0 || a >= kNumActions)
      throw std::invalid_argument("action " + std::to_string(a) + " for env " + std::to_string(i) +
                              " is outside [0, " + std::to_string(kNumActions) + ")");
  }
}

void ProcgenEngine::step(uint8_t* record_obs) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  check_actions();
  pool_->parallel_for(static_cast<int>(instances_.size()), [&](int j) {
    Instance& inst = *instances_[j];
    const int base = inst.first_env, end = base + inst.num_envs;
    if (record_obs) {
      std::memcpy(record_obs + static_cast<size_t>(base) * kObsBytes,
                  buf_.obs + static_cast<size_t>(base) * kObsBytes,
                  static_cast<size_t>(inst.num_envs) * kObsBytes);
    }
    api_->act(inst.handle);
    api_->observe(inst.handle);
    for (int i = base; i < end; ++i) {
      buf_.episode_return[i] += buf_.reward[i];
      buf_.episode_length[i] += 1;
      if (buf_.first[i]) {
        buf_.final_return[i] = buf_.episode_return[i];
        buf_.final_length[i] = buf_.episode_length[i];
        buf_.episode_return[i] = 0.f;
        buf_.episode_length[i] = 0;
      } else {
        buf_.final_return[i] = 0.f;
        buf_.final_length[i] = 0;
      }
    }
  });
}

void ProcgenEngine::force_reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  for (int i = 0; i < num_envs_; ++i) buf_.actions[i] = -1;
  pool_->parallel_for(static_cast<int>(instances_.size()), [&](int j) {
    api_->act(instances_[j]->handle);
    api_->observe(instances_[j]->handle);
  });
  for (int i = 0; i < num_envs_; ++i) {
    buf_.actions[i] = 0;
    buf_.reward[i] = 0.f;
    buf_.episode_return[i] = 0.f;
    buf_.episode_length[i] = 0;
    buf_.final_return[i] = 0.f;
    buf_.final_length[i] = 0;
  }
}

void ProcgenEngine::copy_info(int index, int32_t* out) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  if (index < 0 || index >= static_cast<int>(info_.size())) throw std::out_of_range("info index");
  const auto& raw = info_[index];
  if (info_dtypes_[index] == libenv::kDtypeUint8) {
    for (int i = 0; i < num_envs_; ++i) out[i] = raw[i];
  } else {
    std::memcpy(out, raw.data(), sizeof(int32_t) * num_envs_);
  }
}

}  // namespace lapo
