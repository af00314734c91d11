// Fused EMA vector quantisation on the CPU: nearest-code search, quantised output, indices,
// per-code counts and sums, and the EMA codebook update. Raw pointers here; the Python binding
// (module.cpp) takes numpy views of the torch tensors and checks each one's dtype, contiguity and
// size before any is used (no libtorch link); lapo_fast/ops/vq_layout.py has the strided layout.
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

struct ForwardResult {
  double sq_err = 0.0;      // sum over all elements of (x - q)^2
  int64_t nonfinite = 0;    // > 0: some value, or a row's distance to its code, is NaN or inf (then counts/sums are left unwritten)
  double perplexity = 0.0;  // summed over groups
};

// The EMA update to apply right after the search, in the same call (one crossing from Python
// instead of two, and no count/sum buffers to allocate there: it matters at LAPO's small batches).
struct EmaUpdate {
  float* ema_count;   // (G, K)
  float* ema_weight;  // (G, K, d)
  float* codebook;    // (G, K, d): Problem::codebook, rewritten once the search is done
  float decay, rate, eps;  // rate: 1 - decay, rounded once from the host's double (as torch does)
};

// Nearest code per row (ties to the lowest index), quantised output and indices, and the batch's
// per-code counts[g][k] (and sums[g][k][:] when sums != nullptr); either may be nullptr when the
// caller does not need them (then they live in internal buffers). With `update`, the EMA update
// follows (skipped when a value is not finite). Rows are split into chunks that depend only on
// the problem size and the chunks' partials are added in order, so results are identical for any
// thread count.
ForwardResult forward(const Problem& p, float* counts, float* sums, int num_threads,
                      const EmaUpdate* update = nullptr);

// Whether this CPU runs the AVX2/FMA search (else the portable one).
bool has_avx2();

// The EMA update with LAPO's semantics (decayed counts, Laplace smoothing, codes = weight/count).
void ema_update(int G, int K, int d, const float* counts, const float* sums, float* ema_count,
                float* ema_weight, float* codebook, float decay, float rate, float eps);

}  // namespace lapo::vq
