#include "runtime/pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/simd.h"

namespace cnuma {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxWorkers = size_t{1} << 16;
constexpr int kMaxCpu = 1 << 20;

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// The pool a worker thread belongs to, and its index there (-1 elsewhere).
thread_local const void* t_pool = nullptr;
thread_local int t_index = -1;

}  // namespace

// The threads of one process and the state they share with the dispatcher.
// A forked child leaks its copy (the threads are gone, its locks may be held)
// and starts a new one.
class Pool::Crew {
 public:
  Crew(const Pool* owner, const std::vector<WorkerSlot>& slots, std::chrono::microseconds spin)
      : owner_(owner), slots_(slots), spin_(spin), tids_(slots.size(), 0), pin_errors_(slots.size(), 0) {
    threads_.reserve(slots.size());
    for (size_t i = 0; i < slots.size(); ++i) {
      auto* arg = new std::pair<Crew*, int>(this, static_cast<int>(i));
      pthread_t t;
      const int rc = pthread_create(&t, nullptr, &Crew::thread_main, arg);
      if (rc != 0) {
        delete arg;
        stop_and_join();
        throw std::runtime_error(std::string("cannot start a worker thread: ") + std::strerror(rc));
      }
      threads_.push_back(t);
    }
    {
      std::unique_lock<std::mutex> lk(start_mu_);
      start_cv_.wait(lk, [&] { return started_ == static_cast<int>(threads_.size()); });
    }
    for (size_t i = 0; i < slots.size(); ++i) {
      if (pin_errors_[i] == 0) continue;
      stop_and_join();
      throw std::invalid_argument("cannot pin worker " + std::to_string(i) + " to CPU " +
                                  std::to_string(slots[i].cpu) + ": " + std::strerror(pin_errors_[i]) +
                                  " (is the CPU online and in this process's affinity?)");
    }
  }

  ~Crew() { stop_and_join(); }
  Crew(const Crew&) = delete;
  Crew& operator=(const Crew&) = delete;

  long tid(int i) const { return tids_[i]; }
  int size() const { return static_cast<int>(slots_.size()); }

  void run(const std::function<void(int)>& fn) {
    job_ = &fn;
    error_ = nullptr;
    pending_.store(size(), std::memory_order_relaxed);
    const uint32_t done_before = done_.load(std::memory_order_acquire);
    gen_.fetch_add(1, std::memory_order_release);
    futex_wake_all(&gen_);
    // The caller usually shares a core with a worker: yield rather than spin.
    const auto until = Clock::now() + spin_;
    while (done_.load(std::memory_order_acquire) == done_before && Clock::now() < until) sched_yield();
    while (done_.load(std::memory_order_acquire) == done_before) futex_wait(&done_, done_before);
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void* thread_main(void* p) {
    auto* arg = static_cast<std::pair<Crew*, int>*>(p);
    Crew* self = arg->first;
    const int index = arg->second;
    delete arg;
    self->loop(index);
    return nullptr;
  }

  void loop(int index) {
    t_pool = owner_;
    t_index = index;
    const int cpu = slots_[index].cpu;
    cpu_set_t* set = CPU_ALLOC(cpu + 1);
    const size_t bytes = CPU_ALLOC_SIZE(cpu + 1);
    int rc = ENOMEM;
    if (set != nullptr) {
      CPU_ZERO_S(bytes, set);
      CPU_SET_S(cpu, bytes, set);
      rc = pthread_setaffinity_np(pthread_self(), bytes, set);
      CPU_FREE(set);
    }
    {
      std::lock_guard<std::mutex> lk(start_mu_);
      tids_[index] = syscall(SYS_gettid);
      pin_errors_[index] = rc;
      ++started_;
    }
    start_cv_.notify_all();
    uint32_t seen = 0;
    for (;;) {
      // Spin briefly so back-to-back dispatches are cheap, then sleep in the kernel.
      const auto until = Clock::now() + spin_;
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        cpu_relax();
        if ((++spins & 63) == 0 && Clock::now() >= until) break;
      }
      while (gen_.load(std::memory_order_acquire) == seen) futex_wait(&gen_, seen);
      seen = gen_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      try {
        (*job_)(index);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        done_.fetch_add(1, std::memory_order_release);
        futex_wake_all(&done_);
      }
    }
  }

  void stop_and_join() {
    stop_.store(true, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_release);
    futex_wake_all(&gen_);
    for (pthread_t t : threads_) pthread_join(t, nullptr);
    threads_.clear();
  }

  const Pool* owner_;
  const std::vector<WorkerSlot> slots_;
  const std::chrono::microseconds spin_;
  std::vector<long> tids_;
  std::vector<int> pin_errors_;
  std::vector<pthread_t> threads_;
  std::mutex start_mu_;
  std::condition_variable start_cv_;
  int started_ = 0;
  std::atomic<uint32_t> gen_{0};
  std::atomic<uint32_t> done_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* job_ = nullptr;
  std::mutex error_mu_;
  std::exception_ptr error_;
};

std::pair<int64_t, int64_t> static_chunk(int64_t n, int parts, int part, int64_t align) {
  if (n <= 0 || parts <= 0) return {0, 0};
  if (align < 1) align = 1;
  const int64_t blocks = n / align + (n % align != 0);
  // blocks * part can pass 2^63 for huge n: 128-bit intermediates keep every n exact.
  const int64_t b0 = static_cast<int64_t>(static_cast<__int128>(blocks) * part / parts);
  const int64_t b1 = static_cast<int64_t>(static_cast<__int128>(blocks) * (part + 1) / parts);
  const __int128 e0 = static_cast<__int128>(b0) * align, e1 = static_cast<__int128>(b1) * align;
  return {static_cast<int64_t>(std::min<__int128>(n, e0)), static_cast<int64_t>(std::min<__int128>(n, e1))};
}

Pool::Pool(std::vector<WorkerSlot> slots, int spin_us) : slots_(std::move(slots)) {
  if (slots_.empty()) throw std::invalid_argument("a worker pool needs at least one (cpu, node) slot");
  if (slots_.size() > kMaxWorkers)
    throw std::invalid_argument("a worker pool takes at most " + std::to_string(kMaxWorkers) + " workers, got " +
                                std::to_string(slots_.size()));
  if (spin_us < 0 || spin_us > 1000000)
    throw std::invalid_argument("spin_us must be in [0, 1000000], got " + std::to_string(spin_us));
  std::map<int, int> per_node;
  for (const WorkerSlot& s : slots_) {
    if (s.cpu < 0 || s.cpu >= kMaxCpu)
      throw std::invalid_argument("worker CPU " + std::to_string(s.cpu) + " is out of range");
    if (s.node < 0) throw std::invalid_argument("worker node " + std::to_string(s.node) + " is negative");
    index_in_node_.push_back(per_node[s.node]++);
  }
  spin_ = std::chrono::microseconds(spin_us);
  std::lock_guard<ForkSafeMutex> lk(mu_);
  crew_locked();  // start now, so a CPU we may not run on is an error here
}

Pool::~Pool() {
  std::lock_guard<ForkSafeMutex> lk(mu_);
  if (crew_pid_ != getpid()) (void)crew_.release();  // a forked child: the threads are the parent's
  crew_.reset();
}

Pool::Crew& Pool::crew_locked() {
  if (closed_) throw std::runtime_error("this worker pool was closed");
  const pid_t now = getpid();
  if (crew_ && crew_pid_ != now) {
    // A forked child: the parent's workers do not exist here and the state
    // they shared may be mid-dispatch. Leave it untouched and start afresh.
    (void)crew_.release();
  }
  if (!crew_) {
    crew_.reset(new Crew(this, slots_, spin_));
    crew_pid_ = now;
  }
  return *crew_;
}

std::vector<int> Pool::nodes() const {
  std::vector<int> nodes;
  for (const WorkerSlot& s : slots_) nodes.push_back(s.node);
  std::sort(nodes.begin(), nodes.end());
  nodes.erase(std::unique(nodes.begin(), nodes.end()), nodes.end());
  return nodes;
}

std::vector<WorkerInfo> Pool::workers() {
  std::lock_guard<ForkSafeMutex> lk(mu_);
  Crew& crew = crew_locked();
  std::vector<WorkerInfo> out;
  for (int i = 0; i < size(); ++i)
    out.push_back({i, slots_[i].cpu, slots_[i].node, index_in_node_[i], crew.tid(i)});
  return out;
}

bool Pool::in_worker() { return t_index >= 0; }

void Pool::close() {
  if (in_worker()) throw std::runtime_error("a worker pool cannot be closed from one of its workers");
  std::lock_guard<ForkSafeMutex> lk(mu_);
  if (crew_pid_ != getpid()) (void)crew_.release();
  crew_.reset();
  closed_ = true;
}

void Pool::run_on_workers(const std::function<void(int)>& fn) {
  if (in_worker()) {  // nested: this worker does every share itself
    for (int w = 0; w < size(); ++w) fn(w);
    return;
  }
  std::lock_guard<ForkSafeMutex> lk(mu_);
  crew_locked().run(fn);
}

void Pool::parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (in_worker()) {
    fn(0, n);
    return;
  }
  const int parts = size();
  std::lock_guard<ForkSafeMutex> lk(mu_);
  crew_locked().run([&](int w) {
    const auto [b, e] = static_chunk(n, parts, w, align);
    if (b < e) fn(b, e);
  });
}

void Pool::run_on_nodes(const std::vector<NodeTask>& tasks) {
  if (tasks.empty()) return;
  if (in_worker()) {
    const int self = t_pool == this && t_index < size() ? t_index : 0;  // a worker index valid here
    for (const NodeTask& t : tasks)
      if (t.units > 0) t.fn(0, t.units, self);
    return;
  }
  // For each task: which workers share it, and each worker's position among them.
  std::map<int, std::vector<int>> by_node;
  for (int i = 0; i < size(); ++i) by_node[slots_[i].node].push_back(i);
  std::vector<int> all(slots_.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
  std::vector<const std::vector<int>*> team(tasks.size());
  for (size_t t = 0; t < tasks.size(); ++t) {
    const auto it = by_node.find(tasks[t].node);
    team[t] = it == by_node.end() ? &all : &it->second;
  }
  std::lock_guard<ForkSafeMutex> lk(mu_);
  crew_locked().run([&](int w) {
    for (size_t t = 0; t < tasks.size(); ++t) {
      const std::vector<int>& members = *team[t];
      const auto pos = std::find(members.begin(), members.end(), w);
      if (pos == members.end() || tasks[t].units <= 0) continue;
      const auto [b, e] = static_chunk(tasks[t].units, static_cast<int>(members.size()),
                                       static_cast<int>(pos - members.begin()), tasks[t].align);
      if (b < e) tasks[t].fn(b, e, w);
    }
  });
}

}  // namespace cnuma
