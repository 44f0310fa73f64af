#include "workers.h"
#include "sysfs.h"

#include <dirent.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

namespace cnuma {
namespace {

using Clock = std::chrono::steady_clock;

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}

int read_int(const std::string& path, int fallback) {
  const std::string s = read_text(path);
  try {
    return s.empty() ? fallback : std::stoi(s);
  } catch (const std::exception&) {
    return fallback;
  }
}

// CPU -> NUMA node, from /sys/devices/system/node/nodeN/cpulist.
std::map<int, int> cpu_to_node() {
  std::map<int, int> m;
  DIR* d = opendir("/sys/devices/system/node");
  if (d == nullptr) return m;
  while (dirent* e = readdir(d)) {
    int node;
    char tail;
    if (std::sscanf(e->d_name, "node%d%c", &node, &tail) != 1) continue;
    for (int c : parse_cpulist(read_text("/sys/devices/system/node/" + std::string(e->d_name) +
                                         "/cpulist")))
      m[c] = node;
  }
  closedir(d);
  return m;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  return (end != v && *end == '\0' && x > 0 && x < 1 << 20) ? static_cast<int>(x) : fallback;
}

struct Slot {
  int cpu;
  int node;
};

// One slot per worker: the first allowed CPU of each physical core, cores
// spread over nodes in proportion to their count when fewer workers are asked.
std::vector<Slot> choose_slots(const cpu_set_t& allowed, int requested) {
  const std::map<int, int> node_of = cpu_to_node();
  std::map<int, std::map<std::pair<int, int>, int>> cores;  // node -> core key -> lowest cpu
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &allowed)) continue;
    const std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    const int pkg = read_int(topo + "physical_package_id", 0);
    const int core = read_int(topo + "core_id", -1 - c);  // unknown: every CPU its own core
    const auto it = node_of.find(c);
    const int node = it == node_of.end() ? 0 : it->second;
    auto& per_node = cores[node];
    const auto key = std::make_pair(pkg, core);
    if (per_node.find(key) == per_node.end()) per_node[key] = c;
  }
  std::vector<int> nodes;
  std::vector<std::vector<int>> cpus;  // per node, ascending
  int total = 0;
  for (const auto& [node, m] : cores) {
    nodes.push_back(node);
    std::vector<int> v;
    for (const auto& kv : m) v.push_back(kv.second);
    std::sort(v.begin(), v.end());
    total += static_cast<int>(v.size());
    cpus.push_back(std::move(v));
  }
  if (total == 0) throw std::runtime_error("the calling thread's CPU affinity is empty");
  const int n = requested > 0 ? requested : env_int("COMPOSER_NUMA_THREADS", total);

  std::vector<int> quota(nodes.size(), 0);
  if (n >= total) {
    for (size_t i = 0; i < nodes.size(); ++i) quota[i] = static_cast<int>(cpus[i].size());
  } else {
    // Largest-remainder apportionment, then make sure every node gets a worker
    // when there are enough of them, so node-local tasks stay node-local.
    std::vector<std::pair<double, size_t>> rem;
    int given = 0;
    for (size_t i = 0; i < nodes.size(); ++i) {
      const double exact = static_cast<double>(n) * cpus[i].size() / total;
      quota[i] = static_cast<int>(exact);
      given += quota[i];
      rem.emplace_back(exact - quota[i], i);
    }
    std::stable_sort(rem.begin(), rem.end(), [](auto a, auto b) { return a.first > b.first; });
    for (size_t k = 0; given < n; ++k, ++given) quota[rem[k % rem.size()].second]++;
    if (n >= static_cast<int>(nodes.size())) {
      for (size_t i = 0; i < nodes.size(); ++i) {
        if (quota[i] > 0) continue;
        const size_t donor = std::max_element(quota.begin(), quota.end()) - quota.begin();
        quota[donor]--;
        quota[i]++;
      }
    }
  }
  std::vector<Slot> slots;
  for (size_t i = 0; i < nodes.size(); ++i)
    for (int k = 0; k < quota[i]; ++k) slots.push_back({cpus[i][k], nodes[i]});
  // More workers than cores, only when asked explicitly: wrap around the cores.
  for (int extra = 0; static_cast<int>(slots.size()) < n; ++extra) {
    int k = extra % total;
    for (size_t i = 0; i < nodes.size(); ++i) {
      if (k < static_cast<int>(cpus[i].size())) {
        slots.push_back({cpus[i][k], nodes[i]});
        break;
      }
      k -= static_cast<int>(cpus[i].size());
    }
  }
  std::stable_sort(slots.begin(), slots.end(),
                   [](const Slot& a, const Slot& b) { return a.node < b.node; });
  return slots;
}

thread_local int t_worker = -1;

class Pool {
 public:
  Pool(const cpu_set_t& affinity, int requested) : affinity_(affinity), requested_(requested) {
    spin_ = std::chrono::microseconds(env_int("COMPOSER_NUMA_SPIN_US", 50));
    const std::vector<Slot> slots = choose_slots(affinity, requested);
    infos_.resize(slots.size());
    std::map<int, int> per_node;
    for (size_t i = 0; i < slots.size(); ++i)
      infos_[i] = {static_cast<int>(i), slots[i].cpu, slots[i].node, per_node[slots[i].node]++, 0};
    threads_.reserve(slots.size());
    for (size_t i = 0; i < slots.size(); ++i) {
      auto* arg = new std::pair<Pool*, int>(this, static_cast<int>(i));
      pthread_t t;
      const int rc = pthread_create(&t, nullptr, &Pool::thread_main, arg);
      if (rc != 0) {
        delete arg;
        stop_and_join();
        throw std::runtime_error(std::string("cannot start worker thread: ") + std::strerror(rc));
      }
      threads_.push_back(t);
    }
    std::unique_lock<std::mutex> lk(start_mu_);
    start_cv_.wait(lk, [&] { return started_ == static_cast<int>(threads_.size()); });
  }

  ~Pool() { stop_and_join(); }

  const cpu_set_t& affinity() const { return affinity_; }
  int requested() const { return requested_; }
  const std::vector<WorkerInfo>& infos() const { return infos_; }
  int size() const { return static_cast<int>(infos_.size()); }

  // Caller holds the dispatch mutex.
  void run(const std::function<void(int)>& fn) {
    job_ = &fn;
    error_ = nullptr;
    pending_.store(size(), std::memory_order_relaxed);
    const uint32_t done_before = done_.load(std::memory_order_acquire);
    gen_.fetch_add(1, std::memory_order_release);
    futex_wake_all(&gen_);
    // The caller usually shares a core with a worker: yield rather than spin.
    const auto until = Clock::now() + spin_;
    while (done_.load(std::memory_order_acquire) == done_before && Clock::now() < until)
      sched_yield();
    while (done_.load(std::memory_order_acquire) == done_before) futex_wait(&done_, done_before);
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void* thread_main(void* p) {
    auto* arg = static_cast<std::pair<Pool*, int>*>(p);
    Pool* self = arg->first;
    const int index = arg->second;
    delete arg;
    self->loop(index);
    return nullptr;
  }

  void loop(int index) {
    t_worker = index;
    WorkerInfo& info = infos_[index];
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(info.cpu, &one);
    pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
    {
      std::lock_guard<std::mutex> lk(start_mu_);
      info.tid = syscall(SYS_gettid);
      ++started_;
    }
    start_cv_.notify_all();
    uint32_t seen = 0;
    for (;;) {
      // Spin briefly so back-to-back dispatches are cheap, then sleep in the kernel.
      const auto until = Clock::now() + spin_;
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
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

  cpu_set_t affinity_;
  int requested_;
  std::chrono::microseconds spin_{50};
  std::vector<WorkerInfo> infos_;
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

// Global state: the pool, the mutex that serialises dispatch and (re)creation,
// and the requested size. A forked child drops the parent's pool (its threads
// do not exist there) and builds a new one on first use.
std::mutex g_mu;
Pool* g_pool = nullptr;
int g_requested = 0;

void atfork_prepare() { g_mu.lock(); }
void atfork_parent() { g_mu.unlock(); }
void atfork_child() {
  g_pool = nullptr;  // deliberately leaked: its threads and locks belong to the parent
  g_mu.unlock();
}

struct ExitJoin {
  ~ExitJoin() {
    std::lock_guard<std::mutex> lk(g_mu);
    delete g_pool;
    g_pool = nullptr;
  }
} g_exit_join;

// Returns the pool for the calling thread's current affinity; g_mu is held.
Pool& pool_locked() {
  static std::once_flag atfork_once;
  std::call_once(atfork_once, [] { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); });
  cpu_set_t now;
  CPU_ZERO(&now);
  if (sched_getaffinity(0, sizeof(now), &now) != 0)
    throw std::runtime_error(std::string("sched_getaffinity failed: ") + std::strerror(errno));
  if (g_pool != nullptr &&
      (!CPU_EQUAL(&now, &g_pool->affinity()) || g_pool->requested() != g_requested)) {
    delete g_pool;
    g_pool = nullptr;
  }
  if (g_pool == nullptr) g_pool = new Pool(now, g_requested);
  return *g_pool;
}

}  // namespace

std::pair<int64_t, int64_t> static_chunk(int64_t n, int parts, int part, int64_t align) {
  if (n <= 0 || parts <= 0) return {0, 0};
  if (align < 1) align = 1;
  const int64_t blocks = (n + align - 1) / align;
  const int64_t b0 = blocks * part / parts, b1 = blocks * (part + 1) / parts;
  return {std::min(n, b0 * align), std::min(n, b1 * align)};
}

void run_on_workers(const std::function<void(int)>& fn) {
  if (t_worker >= 0) {  // nested: this worker does every share itself
    const int n = num_threads();
    for (int w = 0; w < n; ++w) fn(w);
    return;
  }
  std::lock_guard<std::mutex> lk(g_mu);
  pool_locked().run(fn);
}

void parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (t_worker >= 0) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> lk(g_mu);
  Pool& p = pool_locked();
  const int parts = p.size();
  p.run([&](int w) {
    const auto [b, e] = static_chunk(n, parts, w, align);
    if (b < e) fn(b, e);
  });
}

void run_on_nodes(const std::vector<NodeTask>& tasks) {
  if (tasks.empty()) return;
  if (t_worker >= 0) {
    for (const NodeTask& t : tasks)
      if (t.units > 0) t.fn(0, t.units, t_worker);
    return;
  }
  std::lock_guard<std::mutex> lk(g_mu);
  Pool& p = pool_locked();
  const auto& infos = p.infos();
  // For each task: which workers share it, and each worker's position among them.
  std::map<int, std::vector<int>> by_node;
  for (const WorkerInfo& w : infos) by_node[w.node].push_back(w.index);
  std::vector<int> all(infos.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
  std::vector<const std::vector<int>*> team(tasks.size());
  for (size_t t = 0; t < tasks.size(); ++t) {
    const auto it = by_node.find(tasks[t].node);
    team[t] = it == by_node.end() ? &all : &it->second;
  }
  p.run([&](int w) {
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

int num_threads() {
  if (t_worker >= 0 && g_pool != nullptr) return g_pool->size();
  std::lock_guard<std::mutex> lk(g_mu);
  return pool_locked().size();
}

std::vector<WorkerInfo> workers() {
  std::lock_guard<std::mutex> lk(g_mu);
  return pool_locked().infos();
}

std::vector<int> worker_nodes() {
  std::vector<int> nodes;
  for (const WorkerInfo& w : workers())
    if (std::find(nodes.begin(), nodes.end(), w.node) == nodes.end()) nodes.push_back(w.node);
  std::sort(nodes.begin(), nodes.end());
  return nodes;
}

bool in_worker() { return t_worker >= 0; }

void set_num_threads(int n) {
  if (n < 0) throw std::invalid_argument("set_num_threads: n must be >= 0 (0 = one per core)");
  if (t_worker >= 0) throw std::runtime_error("set_num_threads cannot be called from a worker");
  std::lock_guard<std::mutex> lk(g_mu);
  g_requested = n;
  delete g_pool;
  g_pool = nullptr;
}

void shutdown_pool() {
  if (t_worker >= 0) throw std::runtime_error("shutdown_pool cannot be called from a worker");
  std::lock_guard<std::mutex> lk(g_mu);
  delete g_pool;
  g_pool = nullptr;
}

}  // namespace cnuma
