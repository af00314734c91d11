// Fused EMA vector quantisation on the CPU: nearest-code search, quantised output, indices,
// per-code counts and sums, and the EMA codebook update. Buffers are passed as raw pointers from
// torch tensors (no libtorch link); see lapo_fast/ops/vq_layout.py for the strided layout.
#pragma once

#include <cstdint>

namespace lapo::vq {

struct Problem {
  const float* x;         // latents, read through the strides below
  float* out;             // quantised latents, same layout as x
  int64_t* indices;       // [b][g][l]
  const float* codebook;  // (G, K, d)
  int64_t batch;          // B
  int G, K, d, L;
  int64_t stride_b, stride_g, stride_k, stride_l;
};

struct SearchResult {
  double sq_err = 0.0;      // sum over all elements of (x - q)^2
  int64_t nonfinite = 0;    // rows with a NaN or inf (their outputs are unspecified)
};

// Pass 1: argmin per row (ties to the lowest index), quantised output and indices.
SearchResult search(const Problem& p, int num_threads);

// Pass 2: counts[g][k] (and sums[g][k][:] when sums != nullptr) of the rows assigned to each code,
// summed in row order (deterministic for any thread count). Returns the perplexity summed over
// groups.
double accumulate(const Problem& p, float* counts, float* sums, int num_threads);

// The EMA update with LAPO's semantics (decayed counts, Laplace smoothing, codes = weight/count).
void ema_update(int G, int K, int d, const float* counts, const float* sums, float* ema_count,
                float* ema_weight, float* codebook, float decay, float eps);

}  // namespace lapo::vq
