// Gaussian noise for the private gradient: counter-based (Philox4x32-10) normals, so the values
// depend only on (seed, position), never on the thread count, and any chunk can be generated
// independently in parallel.
#pragma once

#include <cstdint>

namespace fastclip {

// x[i] = (x[i] + std * z_i) * scale for i in [0, n), z_i ~ N(0, 1) i.i.d., where z_i is the
// normal number i of the stream (seed). std == 0 skips the generation entirely.
void add_gaussian_noise(float* x, int64_t n, double std, double scale, uint64_t seed,
                        int num_threads);
void add_gaussian_noise(double* x, int64_t n, double std, double scale, uint64_t seed,
                        int num_threads);

// Several tensors in one call, the finiteness check first: if any element of any xs[t] is NaN or
// infinite, returns false having written nothing; otherwise xs[t][i] = (xs[t][i] + std * z) * scale
// with z the normal number i of the stream (seeds[t]) -- bit for bit what add_gaussian_noise does
// per tensor -- and returns true. One pool dispatch per phase over all the tensors' blocks.
bool add_gaussian_noise_checked(float* const* xs, const int64_t* ns, int64_t count, double std,
                                double scale, const uint64_t* seeds, int num_threads);
bool add_gaussian_noise_checked(double* const* xs, const int64_t* ns, int64_t count, double std,
                                double scale, const uint64_t* seeds, int num_threads);

// Whether every element of every xs[t] is finite (reads only).
bool all_finite(const float* const* xs, const int64_t* ns, int64_t count, int num_threads);
bool all_finite(const double* const* xs, const int64_t* ns, int64_t count, int num_threads);

// The first n normals of the stream (seed), in float: for tests of the distribution.
void gaussian(float* out, int64_t n, uint64_t seed, int num_threads);

}  // namespace fastclip
