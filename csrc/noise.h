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

// The first n normals of the stream (seed), in float: for tests of the distribution.
void gaussian(float* out, int64_t n, uint64_t seed, int num_threads);

}  // namespace fastclip
