#include "common.h"

#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace fastclip {
namespace {

using Fn = std::function<void(int64_t, int64_t)>;

// Subnormal floats flushed to zero while a kernel runs on a thread, the thread's mode restored
// after. Why: a Gram matrix of small output gradients (entries ~1e-20, common for confidently
// classified examples late in training) is made of subnormal products, and each one costs the CPU
// a microcode assist: the ghost norm ran 50x slower (1.4 -> 75 ms, 16 x 128 x 256). What it
// changes: every flushed value is below 2^-126 (float) / 2^-1022 (double) in magnitude, so a
// squared norm moves by less than that times the number of terms, far below its rounding error
// at any norm that clipping acts on (a norm below C gets factor 1 either way).
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#elif defined(__aarch64__)
  FlushSubnormals() {
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t fz = saved_ | (uint64_t{1} << 24);
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fz));
  }
  ~FlushSubnormals() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

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

// torch's own OpenMP team, when the process has one (torch's CPU wheels load libgomp). Its workers
// spin for a while after every torch op; a second pool of ours would then compete with them for
// the same cores (3 runnable threads on 2 cores), and the caller ends up running every chunk
// itself. Running our loops on that team instead hands the chunks to threads that are already
// awake, and the process keeps one worker per core. Looked up at runtime (RTLD_NOLOAD: only if
// already loaded), so the core neither links OpenMP nor depends on torch.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpInParallel = int (*)();
struct Team {
  GompParallel parallel = nullptr;
  OmpInParallel in_parallel = nullptr;
};
std::atomic<bool> g_forked{false};  // libgomp's team is not usable in a forked child

Team find_team() {
  Team t;
  if (std::getenv("FASTCLIP_OWN_POOL")) return t;  // benchmarks and tests compare both pools
  void* lib = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (!lib) return t;
  t.parallel = reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel"));
  t.in_parallel = reinterpret_cast<OmpInParallel>(dlsym(lib, "omp_in_parallel"));
  if (!t.parallel || !t.in_parallel) t = Team();
  return t;  // the handle stays open on purpose: the team lives as long as the process
}

// Looked up on first use, not at load: torch may be imported after the core.
const Team& team() {
  static const Team t = find_team();
  return t;
}

// In a forked child the parent's workers are gone and its mutexes may be held by threads that no
// longer exist; forget the old pool (leaked on purpose) so the child starts a fresh one if needed.
void forget_pool_in_child() {
  g_pool.store(nullptr);
  g_forked.store(true);
}
const int g_atfork_registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);

Pool* get_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return p;
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh)) return fresh;
  delete fresh;  // another thread won; no workers were started on ours
  return p;
}

// One thread's share of a job (Pool or TeamJob): chunks taken until none are left, with
// subnormals flushed (restored after, also on torch's threads) and the first exception kept for
// the caller (none may leave a pool worker or an OpenMP region).
template <class Job>
void take_chunks(Job* job) {
  FlushSubnormals flush;
  const bool was_inside = t_inside_job;
  t_inside_job = true;
  for (;;) {
    const int64_t begin = job->next.fetch_add(job->chunk);
    if (begin >= job->n) break;
    const int64_t end = std::min(job->n, begin + job->chunk);
    try {
      (*job->fn)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lk(job->mu);
      if (!job->error) job->error = std::current_exception();
    }
  }
  t_inside_job = was_inside;
}

void run_chunks(Pool* p) { take_chunks(p); }

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

// One job on the OpenMP team: every member (the caller is member 0) takes chunks until none are
// left (take_chunks).
struct TeamJob {
  TeamJob(const Fn* f, int64_t items, int64_t c) : fn(f), n(items), chunk(c) {}
  const Fn* fn;
  int64_t n, chunk;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::exception_ptr error;
};

void run_team_chunks(void* data) { take_chunks(static_cast<TeamJob*>(data)); }

// Serialises use of the team the way Pool::use does for ours: a second caller runs serially.
std::mutex g_team_use;

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

namespace {
int detect_isa() {
  const char* cap = std::getenv("FASTCLIP_ISA");
  const std::string want = cap ? cap : "";
  if (want == "portable") return kIsaPortable;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
  __builtin_cpu_init();
  if (want != "avx2" && __builtin_cpu_supports("avx512f")) return kIsaAvx512;
  if (__builtin_cpu_supports("avx2")) return kIsaAvx2;
#endif
  return kIsaPortable;
}
}  // namespace

int isa_level() {
  static const int level = detect_isa();
  return level;
}

const char* isa_name() {
  switch (isa_level()) {
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2";
    default: return "portable";
  }
}

std::string parallel_backend() {
  return team().parallel && !g_forked.load() ? "openmp" : "own";
}

void parallel_for(int64_t n_items, int num_threads, const Fn& fn) {
  (void)g_atfork_registered;
  if (n_items <= 0) return;
  const int64_t threads_wanted = std::min<int64_t>(std::max(num_threads, 1), n_items);
  const auto serial = [&] {
    FlushSubnormals flush;
    fn(0, n_items);
  };
  if (threads_wanted <= 1 || t_inside_job) return serial();
  // ~4 chunks per thread balances uneven examples without much scheduling overhead.
  const auto chunk_for = [&](int64_t threads) {
    return std::max<int64_t>(1, (n_items + 4 * threads - 1) / (4 * threads));
  };
  const Team& t = team();
  if (t.parallel && !g_forked.load() && !t.in_parallel()) {
    std::unique_lock<std::mutex> use(g_team_use, std::try_to_lock);
    if (!use.owns_lock()) return serial();  // another thread has the team: serial beats waiting
    TeamJob job(&fn, n_items, chunk_for(threads_wanted));
    t.parallel(run_team_chunks, &job, static_cast<unsigned>(threads_wanted), 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  Pool* p = get_pool();
  std::unique_lock<std::mutex> use(p->use, std::try_to_lock);
  if (!use.owns_lock()) return serial();  // another thread is using the pool
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
    p->chunk = chunk_for(threads);
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
