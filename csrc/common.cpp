#include "common.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

namespace fastclip {
namespace {

using Fn = std::function<void(int64_t, int64_t)>;

// One job at a time: `use` is held by the parallel_for that owns the pool. Workers are detached and
// the Pool is never destroyed: joining at interpreter exit could deadlock, and a forked child must
// be able to drop the whole object (its workers do not exist there) without touching it.
struct Pool {
  std::mutex use;
  std::mutex mu;
  std::condition_variable wake, done;
  int n_workers = 0;
  uint64_t generation = 0;  // bumped once per job; a worker runs a job iff its index < wanted
  int wanted = 0;
  // A job is open until the caller has run out of chunks; only workers that joined while it was
  // open (active) are waited for, so a worker the OS has not scheduled yet never delays the caller.
  bool open = false;
  int active = 0;
  const Fn* fn = nullptr;
  int64_t n = 0, chunk = 1;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
};

std::atomic<Pool*> g_pool{nullptr};
thread_local bool t_inside_job = false;  // nested parallel_for runs serially instead of deadlocking

// In a forked child the parent's workers are gone and its mutexes may be held by threads that no
// longer exist; forget the old pool (leaked on purpose) so the child starts a fresh one if needed.
void forget_pool_in_child() { g_pool.store(nullptr); }
const int g_atfork_registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);

Pool* get_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return p;
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh)) return fresh;
  delete fresh;  // another thread won; no workers were started on ours
  return p;
}

void run_chunks(Pool* p) {
  t_inside_job = true;
  for (;;) {
    const int64_t begin = p->next.fetch_add(p->chunk);
    if (begin >= p->n) break;
    const int64_t end = std::min(p->n, begin + p->chunk);
    try {
      (*p->fn)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lk(p->mu);
      if (!p->error) p->error = std::current_exception();
    }
  }
  t_inside_job = false;
}

void worker_loop(Pool* p, int index, uint64_t seen) {
  std::unique_lock<std::mutex> lk(p->mu);
  for (;;) {
    p->wake.wait(lk, [&] { return p->generation != seen; });
    seen = p->generation;
    if (index >= p->wanted || !p->open) continue;
    ++p->active;
    lk.unlock();
    run_chunks(p);
    lk.lock();
    if (--p->active == 0) p->done.notify_all();
  }
}

// The 8 independent lanes let the compiler vectorise without -ffast-math (no reassociation).
template <class T>
inline double dot_impl(const T* x, const T* y, int64_t n) {
  constexpr int64_t kRun = 512;
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kRun) {
    const int64_t m = std::min(n - i0, kRun);
    const T* a = x + i0;
    const T* b = y + i0;
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= m; i += 8)
      for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
    double run = 0.0;
    for (; i < m; ++i) run += static_cast<double>(a[i]) * static_cast<double>(b[i]);
    for (int k = 0; k < 8; ++k) run += static_cast<double>(acc[k]);
    total += run;
  }
  return total;
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTCLIP_MULTIVERSION __attribute__((target_clones("avx2,fma", "default")))
#else
#define FASTCLIP_MULTIVERSION
#endif

FASTCLIP_MULTIVERSION double dot(const float* x, const float* y, int64_t n) {
  return dot_impl(x, y, n);
}
FASTCLIP_MULTIVERSION double dot(const double* x, const double* y, int64_t n) {
  return dot_impl(x, y, n);
}

void parallel_for(int64_t n_items, int num_threads, const Fn& fn) {
  (void)g_atfork_registered;
  if (n_items <= 0) return;
  const int64_t threads_wanted = std::min<int64_t>(std::max(num_threads, 1), n_items);
  if (threads_wanted <= 1 || t_inside_job) {
    fn(0, n_items);
    return;
  }
  Pool* p = get_pool();
  std::unique_lock<std::mutex> use(p->use, std::try_to_lock);
  if (!use.owns_lock()) {  // another Python thread is using the pool: serial beats waiting
    fn(0, n_items);
    return;
  }
  int threads = static_cast<int>(threads_wanted);
  {
    std::lock_guard<std::mutex> lk(p->mu);
    while (p->n_workers < threads - 1) {
      try {
        std::thread(worker_loop, p, p->n_workers, p->generation).detach();
      } catch (const std::system_error&) {  // out of threads: run with what we have
        threads = p->n_workers + 1;
        break;
      }
      ++p->n_workers;
    }
    p->fn = &fn;
    p->n = n_items;
    // ~4 chunks per thread balances uneven examples without much scheduling overhead.
    p->chunk = std::max<int64_t>(1, (n_items + 4 * threads - 1) / (4 * threads));
    p->next.store(0);
    p->wanted = threads - 1;
    p->open = true;
    p->error = nullptr;
    ++p->generation;
  }
  p->wake.notify_all();
  run_chunks(p);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lk(p->mu);
    p->open = false;
    p->done.wait(lk, [&] { return p->active == 0; });
    error = p->error;
    p->fn = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace fastclip
