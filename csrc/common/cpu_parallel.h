// Worker threads for the CPU kernels (decode, crop): a bounded pool that never terminates the
// process. std::thread's constructor throws std::system_error when the system refuses a thread
// (RLIMIT_NPROC, address space, threads-max); a vector of already-started threads destroyed
// during that unwinding calls std::terminate. Here a refused thread simply means fewer workers:
// tasks are pulled from a shared counter, so the calling thread alone still finishes the work.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace cnpose {

// Threads never exceed this many per processor (hardware_concurrency), nor the number of tasks.
constexpr int64_t kThreadsPerCore = 4;

// Testing hook (_C._set_thread_spawn_limit): after this many more successful thread creations,
// creation fails as if the system refused. Negative: no limit. Defined in cpu_common.cpp.
std::atomic<int64_t>& thread_spawn_budget();

inline bool take_spawn_token() {
  std::atomic<int64_t>& budget = thread_spawn_budget();
  for (int64_t b = budget.load(std::memory_order_relaxed); b >= 0;) {
    if (b == 0) return false;
    if (budget.compare_exchange_weak(b, b - 1, std::memory_order_relaxed)) return true;
  }
  return true;
}

inline int64_t hardware_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int64_t>(hw);
}

// Threads a request may use: 0 means one per processor; capped by tasks and kThreadsPerCore.
inline int64_t thread_cap(int64_t requested, int64_t tasks) {
  const int64_t hw = hardware_threads();
  const int64_t want = requested > 0 ? requested : hw;
  return std::max<int64_t>(1, std::min({want, tasks, hw * kThreadsPerCore}));
}

// Runs worker(slot) on up to `threads` threads (slot 0 is the calling thread, slots are
// distinct), returns the number that ran. The worker pulls its own tasks; an exception thrown
// by a worker is rethrown here after every thread has been joined.
template <class Worker>
int64_t run_parallel(int64_t threads, Worker&& worker) {
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int64_t slot) {
    try {
      worker(slot);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(static_cast<size_t>(std::max<int64_t>(0, threads - 1)));
  } catch (const std::bad_alloc&) {
    threads = 1;
  }
  for (int64_t slot = 1; slot < threads; ++slot) {
    if (!take_spawn_token()) break;
    try {
      pool.emplace_back(guarded, slot);
    } catch (const std::system_error&) {
      break;  // the system refused a thread: run with the ones we have
    }
  }
  guarded(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  return static_cast<int64_t>(pool.size()) + 1;
}

}  // namespace cnpose
