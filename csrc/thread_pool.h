// A tiny persistent thread pool for data-parallel loops: the caller takes part in the work,
// tasks are handed out one index at a time through an atomic counter (so one slow task, e.g. a
// procgen level generation on reset, does not hold up a whole static slice), and there is one
// synchronisation per parallel_for.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <unistd.h>

namespace lapo {

class ThreadPool {
 public:
  // spin: how long a worker (and the caller, waiting for the workers) polls before sleeping on
  // the condition variable. Waking a sleeping thread can cost more than a whole small VQ call; a
  // short spin keeps back-to-back calls from paying it, and bounds what an idle pool burns.
  explicit ThreadPool(int num_threads, std::chrono::microseconds spin = std::chrono::microseconds(0))
      : spin_(spin), owner_(getpid()) {
    for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  ~ThreadPool() {
    if (forked()) {
      // A fork's child has none of the workers, and its copies of the mutex and condition
      // variables still count the parent's waiters: joining or destroying them would hang. The
      // thread handles are left behind and the primitives made fresh (the child's memory goes with it).
      new std::vector<std::thread>(std::move(workers_));
      new (&mutex_) std::mutex();
      new (&start_cv_) std::condition_variable();
      new (&done_cv_) std::condition_variable();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_.store(true);
    }
    start_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(i) for i in [0, n). Rethrows the first exception a task threw, after all finish.
  void parallel_for(int n, const std::function<void(int)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1 || forked()) {  // in a fork's child the caller works alone
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    task_ = &fn;
    num_tasks_ = n;
    error_ = nullptr;
    next_.store(0, std::memory_order_relaxed);
    busy_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
      // Published under the mutex so that a worker about to sleep either sees it or is woken.
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    start_cv_.notify_all();
    run_tasks();
    if (!spin_until([this] { return busy_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_cv_.wait(lock, [this] { return busy_.load(std::memory_order_acquire) == 0; });
    }
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  bool forked() const { return getpid() != owner_; }

  template <typename Ready>
  bool spin_until(Ready ready) const {
    if (ready()) return true;
    if (spin_.count() == 0) return false;
    const auto deadline = std::chrono::steady_clock::now() + spin_;
    for (int i = 1;; ++i) {
      if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) return ready();
    }
  }

  void run_tasks() {
    for (;;) {
      int i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= num_tasks_) return;
      try {
        (*task_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      auto started = [&] {
        return stopping_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen;
      };
      if (!spin_until(started)) {
        std::unique_lock<std::mutex> lock(mutex_);
        start_cv_.wait(lock, started);
      }
      if (stopping_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      run_tasks();
      if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);  // the caller may be about to sleep: see it wake
        done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  const std::chrono::microseconds spin_;
  const pid_t owner_;  // the process whose threads these are
  std::mutex mutex_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int)>* task_ = nullptr;
  int num_tasks_ = 0;
  std::atomic<int> next_{0};
  std::atomic<int> busy_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  std::exception_ptr error_;
};

}  // namespace lapo
