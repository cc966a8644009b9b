#include "blas.h"

#include <type_traits>

#include "gemm_avx512.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "common.h"

namespace fastclip {
namespace blas {
namespace {

// CBLAS enum values (cblas.h); passed as int, which is their ABI.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kUpper = 121;

using sgemm_t = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
using dgemm_t = void (*)(int, int, int, int, int, int, double, const double*, int, const double*,
                         int, double, double*, int);
using ssyrk_t = void (*)(int, int, int, int, int, float, const float*, int, float, float*, int);
using dsyrk_t = void (*)(int, int, int, int, int, double, const double*, int, double, double*, int);

struct Library {
  std::string path, config;
  sgemm_t sgemm;
  dgemm_t dgemm;
  ssyrk_t ssyrk;
  dsyrk_t dsyrk;
  bool small_gemm = false;  // see small_gemm_beats_syrk()
  // OPENBLAS_CORETYPE when the library was loaded: it overrides OpenBLAS' own choice of kernels
  // (an environment that pins Haswell on an AVX-512 machine halves the GEMM rate), so info()
  // names it beside the core it produced.
  std::string pinned_core;
};

// Published once fully initialised; a replaced Library (and its dlopen handle) is never freed,
// because a kernel on another thread may still be calling into it.
std::atomic<const Library*> g_lib{nullptr};
std::atomic<bool> g_enabled{true};
std::mutex g_load_mu;

const Library* active() {
  return g_enabled.load(std::memory_order_relaxed) ? g_lib.load(std::memory_order_acquire)
                                                   : nullptr;
}

// BLAS takes int sizes and needs every leading dimension >= the row length (and >= 1); anything
// else (huge sizes, broadcast rows with stride 0) goes to the loops instead.
bool fits(std::initializer_list<int64_t> sizes, std::initializer_list<std::pair<int64_t, int64_t>> lds) {
  for (int64_t s : sizes)
    if (s < 0 || s > INT_MAX) return false;
  for (auto [ld, cols] : lds)
    if (ld > INT_MAX || ld < std::max<int64_t>(cols, 1)) return false;
  return true;
}

void call_gemm(const Library* L, int ta, int tb, int64_t m, int64_t n, int64_t k, const float* A,
               int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  L->sgemm(kRowMajor, ta, tb, int(m), int(n), int(k), 1.0f, A, int(lda), B, int(ldb), 0.0f, C,
           int(ldc));
}
void call_gemm(const Library* L, int ta, int tb, int64_t m, int64_t n, int64_t k, const double* A,
               int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc) {
  L->dgemm(kRowMajor, ta, tb, int(m), int(n), int(k), 1.0, A, int(lda), B, int(ldb), 0.0, C,
           int(ldc));
}
// trans = kNoTrans: C = A A^T (A n x k); kTrans: C = A^T A (A k x n).
void call_syrk(const Library* L, int trans, int64_t n, int64_t k, const float* A, int64_t lda,
               float* C, int64_t ldc) {
  L->ssyrk(kRowMajor, kUpper, trans, int(n), int(k), 1.0f, A, int(lda), 0.0f, C, int(ldc));
}
void call_syrk(const Library* L, int trans, int64_t n, int64_t k, const double* A, int64_t lda,
               double* C, int64_t ldc) {
  L->dsyrk(kRowMajor, kUpper, trans, int(n), int(k), 1.0, A, int(lda), 0.0, C, int(ldc));
}

}  // namespace

bool load(const std::string& path, std::string* error) {
  std::lock_guard<std::mutex> lk(g_load_mu);
  // RTLD_LOCAL keeps its symbols out of the global namespace (torch brings its own BLAS).
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    if (error) *error = dlerror();
    return false;
  }
  auto sym = [&](const char* name) { return dlsym(handle, name); };
  auto* lib = new Library{path, "", reinterpret_cast<sgemm_t>(sym("scipy_cblas_sgemm")),
                          reinterpret_cast<dgemm_t>(sym("scipy_cblas_dgemm")),
                          reinterpret_cast<ssyrk_t>(sym("scipy_cblas_ssyrk")),
                          reinterpret_cast<dsyrk_t>(sym("scipy_cblas_dsyrk"))};
  auto set_threads = reinterpret_cast<void (*)(int)>(sym("scipy_openblas_set_num_threads"));
  auto get_config = reinterpret_cast<const char* (*)()>(sym("scipy_openblas_get_config"));
  if (!lib->sgemm || !lib->dgemm || !lib->ssyrk || !lib->dsyrk || !set_threads) {
    if (error) *error = "missing scipy_cblas_* / scipy_openblas_set_num_threads symbols in " + path;
    delete lib;
    dlclose(handle);
    return false;
  }
  set_threads(1);
  if (get_config) lib->config = get_config();
  if (const char* pinned = std::getenv("OPENBLAS_CORETYPE")) lib->pinned_core = pinned;
  // The config names the kernel core picked for this CPU (DYNAMIC_ARCH), e.g. "... Haswell ...".
  for (const char* core : {"SkylakeX", "Cooperlake", "SapphireRapids"})
    if (lib->config.find(core) != std::string::npos) lib->small_gemm = true;
  g_lib.store(lib, std::memory_order_release);
  return true;
}

bool loaded() { return g_lib.load() != nullptr; }

bool set_enabled(bool enabled) { return g_enabled.exchange(enabled); }

bool small_gemm_beats_syrk() {
  const Library* L = active();
  return L && L->small_gemm;
}

std::string info() {
  const Library* L = g_lib.load();
  if (!L) return "no BLAS loaded: plain C++ loops";
  std::string s = "OpenBLAS (" + L->config + ") from " + L->path;
  if (!L->pinned_core.empty()) s += " [kernels pinned by OPENBLAS_CORETYPE=" + L->pinned_core + "]";
  if (!g_enabled.load()) s += " [disabled: plain C++ loops]";
  return s;
}

// float32 A^T B products go to fastclip's AVX-512 kernel where it runs (gemm_avx512.h: the BLAS
// at hand runs them at the AVX2 rate on the hosts measured), unless the BLAS path is turned off
// (set_enabled(false): the plain loops below, for tests).
template <class T>
bool tn_kernel(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool upper) {
  if constexpr (std::is_same_v<T, float>) {
    if (g_enabled.load(std::memory_order_relaxed) && gemm_kernels_enabled()) {
      tn_gemm(m, n, k, A, lda, B, ldb, C, ldc, upper);
      return true;
    }
  }
  (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc;
  (void)upper;
  return false;
}

// A B^T (A: m x k, B: n x k) as tn_kernel on the transposed factors, for products big enough that
// the transposes (m k + n k moves against m n k multiply-adds) are noise.
template <class T>
bool nt_kernel(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool upper) {
  if constexpr (std::is_same_v<T, float>) {
    if (m >= 32 && n >= 32 && k > 0 && g_enabled.load(std::memory_order_relaxed) &&
        gemm_kernels_enabled()) {
      thread_local std::vector<float> at, bt;
      at.resize(size_t(k * m));
      transpose_f32(m, k, A, lda, at.data(), m);
      const float* b = at.data();
      if (B != A || ldb != lda || n != m) {
        bt.resize(size_t(k * n));
        transpose_f32(n, k, B, ldb, bt.data(), n);
        b = bt.data();
      }
      tn_gemm(m, n, k, at.data(), m, b, n, C, ldc, upper);
      return true;
    }
  }
  (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc;
  (void)upper;
  return false;
}

template <class T>
void syrk_upper(int64_t n, int64_t k, const T* A, int64_t lda, T* C, int64_t ldc) {
  if (n == 0) return;
  if (nt_kernel(n, n, k, A, lda, A, lda, C, ldc, true)) return;
  const Library* L = active();
  if (L && k > 0 && fits({n, k, ldc}, {{lda, k}, {ldc, n}})) {
    call_syrk(L, kNoTrans, n, k, A, lda, C, ldc);
    return;
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = r; c < n; ++c) C[r * ldc + c] = static_cast<T>(dot(A + r * lda, A + c * lda, k));
}

template <class T>
void syrk_upper_t(int64_t n, int64_t k, const T* A, int64_t lda, T* C, int64_t ldc) {
  if (n == 0) return;
  if (tn_kernel(n, n, k, A, lda, A, lda, C, ldc, true)) return;
  const Library* L = active();
  if (L && k > 0 && fits({n, k, ldc}, {{lda, n}, {ldc, n}})) {
    call_syrk(L, kTrans, n, k, A, lda, C, ldc);
    return;
  }
  // Rank-1 updates of the upper triangle, along contiguous rows of A and C (as gemm_tn).
  for (int64_t r = 0; r < n; ++r) std::fill(C + r * ldc + r, C + r * ldc + n, T(0));
  for (int64_t t = 0; t < k; ++t) {
    const T* a = A + t * lda;
    for (int64_t r = 0; r < n; ++r) {
      const T ar = a[r];
      T* c = C + r * ldc;
      for (int64_t j = r; j < n; ++j) c[j] += ar * a[j];
    }
  }
}

template <class T>
void gemm_nt(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (nt_kernel(m, n, k, A, lda, B, ldb, C, ldc, false)) return;
  const Library* L = active();
  if (L && k > 0 && fits({m, n, k}, {{lda, k}, {ldb, k}, {ldc, n}})) {
    call_gemm(L, kNoTrans, kTrans, m, n, k, A, lda, B, ldb, C, ldc);
    return;
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) C[r * ldc + c] = static_cast<T>(dot(A + r * lda, B + c * ldb, k));
}

template <class T>
void gemm_tn(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (tn_kernel(m, n, k, A, lda, B, ldb, C, ldc, false)) return;
  const Library* L = active();
  if (L && k > 0 && fits({m, n, k}, {{lda, m}, {ldb, n}, {ldc, n}})) {
    call_gemm(L, kTrans, kNoTrans, m, n, k, A, lda, B, ldb, C, ldc);
    return;
  }
  // Rank-1 updates: the inner loop runs along contiguous rows of B and C, so it vectorises.
  for (int64_t r = 0; r < m; ++r) std::fill(C + r * ldc, C + r * ldc + n, T(0));
  for (int64_t t = 0; t < k; ++t) {
    const T* a = A + t * lda;
    const T* b = B + t * ldb;
    for (int64_t r = 0; r < m; ++r) {
      const T ar = a[r];
      T* c = C + r * ldc;
      for (int64_t j = 0; j < n; ++j) c[j] += ar * b[j];
    }
  }
}

#define FASTCLIP_INSTANTIATE(T)                                                               \
  template void syrk_upper<T>(int64_t, int64_t, const T*, int64_t, T*, int64_t);              \
  template void syrk_upper_t<T>(int64_t, int64_t, const T*, int64_t, T*, int64_t);            \
  template void gemm_nt<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, \
                           int64_t);                                                          \
  template void gemm_tn<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, \
                           int64_t);
FASTCLIP_INSTANTIATE(float)
FASTCLIP_INSTANTIATE(double)
#undef FASTCLIP_INSTANTIATE

}  // namespace blas
}  // namespace fastclip
