// A mutex a forked child can use even when a thread of the parent held it at
// the moment of fork(): that thread does not exist in the child, so the
// inherited lock would never be released and the child would hang on it.
//
// The mutex remembers the process it belongs to. The first lock() in another
// process (a forked child) replaces it with a fresh, unlocked one; concurrent
// lockers in that child wait until the one that replaces it is done. Whatever
// the lock protected may be half-updated in the child: its owner re-creates
// that state too (see Pool, which starts new workers there).
#pragma once

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <new>

namespace cnuma {

class ForkSafeMutex {
 public:
  ForkSafeMutex() : pid_(getpid()) {}
  ForkSafeMutex(const ForkSafeMutex&) = delete;
  ForkSafeMutex& operator=(const ForkSafeMutex&) = delete;

  void lock() {
    revive();
    mu_.lock();
  }
  void unlock() { mu_.unlock(); }

 private:
  void revive() {
    const pid_t now = getpid();
    pid_t seen = pid_.load(std::memory_order_acquire);
    if (seen == now) return;
    // -now marks "being replaced in process now"; exactly one thread wins it.
    if (pid_.compare_exchange_strong(seen, -now, std::memory_order_acq_rel)) {
      // The inherited mutex may be held by a thread that does not exist here:
      // reuse its storage for a fresh one (glibc's mutex needs no destruction).
      new (&mu_) std::mutex();
      pid_.store(now, std::memory_order_release);
      return;
    }
    while (pid_.load(std::memory_order_acquire) != now) sched_yield();
  }

  std::atomic<pid_t> pid_;
  std::mutex mu_;
};

}  // namespace cnuma
