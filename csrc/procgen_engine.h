// Batched Procgen engine: many libenv instances (each with num_threads=0, so each steps in-line in
// whoever calls it), stepped by our own thread pool into one set of caller-owned output buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <variant>
#include <vector>

#include "libenv_api.h"
#include "thread_pool.h"

namespace lapo {

using OptionValue = std::variant<bool, int32_t, std::string>;
using OptionList = std::vector<std::pair<std::string, OptionValue>>;

struct InstanceSpec {
  std::string game;
  int num_envs;
  int32_t rand_seed;
};

// The outputs the engine writes on every step, all indexed by env: obs is (N, 64, 64, 3) uint8,
// the rest (N,). Owned by the caller (numpy / pinned torch memory), which keeps them alive.
struct StepBuffers {
  uint8_t* obs;
  float* reward;
  uint8_t* first;       // 1 where the episode ended on this step (obs is already the next one's)
  int32_t* actions;     // read by the engine; the caller writes them before step()
  float* episode_return;
  int32_t* episode_length;
  float* final_return;  // return / length of the episode that ended on this step, else 0
  int32_t* final_length;
};

class ProcgenEngine {
 public:
  static constexpr int kObsBytes = 64 * 64 * 3;
  static constexpr int kNumActions = 15;

  ProcgenEngine(const std::string& lib_path, const std::vector<InstanceSpec>& instances,
                const OptionList& common_options, int num_threads, StepBuffers buffers);
  ~ProcgenEngine();
  ProcgenEngine(const ProcgenEngine&) = delete;
  ProcgenEngine& operator=(const ProcgenEngine&) = delete;

  int num_envs() const { return num_envs_; }
  int num_threads() const { return pool_->num_threads(); }
  bool closed() const { return instances_.empty(); }

  // Steps every env with the actions in buffers.actions. If record_obs is given (N*kObsBytes
  // bytes), the observation each env acted on is copied there first, by the worker threads.
  // Call without the GIL.
  void step(uint8_t* record_obs);
  // Abandons every episode (libenv action -1): obs becomes a fresh episode's first frame.
  void force_reset();
  void close();

  const std::vector<std::string>& info_names() const { return info_names_; }
  // Copies info key `index` (one integer scalar per env in procgen) into out as int32 (N values).
  void copy_info(int index, int32_t* out) const;

 private:
  struct Instance;
  void check_open() const;
  void check_actions() const;

  const libenv::Api* api_;
  std::vector<std::unique_ptr<Instance>> instances_;
  std::unique_ptr<ThreadPool> pool_;
  StepBuffers buf_;
  int num_envs_ = 0;
  std::vector<std::string> info_names_;
  std::vector<int> info_dtypes_;             // uint8 or int32 scalars per env
  std::vector<std::vector<uint8_t>> info_;   // [key][env * dtype size]
  mutable std::mutex mutex_;                 // one step at a time per engine
};

}  // namespace lapo
