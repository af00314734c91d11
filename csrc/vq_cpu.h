// Fused EMA vector quantisation on the CPU: nearest-code search, quantised output, indices,
// per-code counts and sums, and the EMA codebook update. Raw pointers here; the Python binding
// (module.cpp) takes numpy views of the torch tensors and checks each one's dtype, contiguity and
// size before any is used (no libtorch link); lapo_fast/ops/vq_layout.py has the strided layout.
#pragma once

#include <cstdint>
#include <vector>

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

// forward() in three steps, each testable alone (csrc/tests/test_vq_cpu.cpp):
// 1. planning: the rows cut into tasks (group x chunk of rows), by the problem only, never by the
//    thread count, so the reduction adds the same partials in the same order for any thread count;
struct ChunkPlan {
  int64_t rows = 0;            // batch * L, per group
  int64_t rows_per_chunk = 0;  // a multiple of 4 in LAPO blocks (whole samples)
  int64_t chunks = 0;          // per group
  int tasks = 0;               // chunks * G; task t: group t / chunks, chunk t % chunks
  bool lapo_blocks = false;    // d 16, L 4, dense: moved with 4x4 transposes
  bool parallel = false;       // enough work for the pool (else one thread)
};
ChunkPlan plan_chunks(const Problem& p);

// 2. search: every task's nearest codes (ties to the lowest index), output and indices, and its
//    partials;
struct Partials {
  std::vector<double> sq_err;      // [task]
  std::vector<int64_t> nonfinite;  // [task]: values (or rows' distances) that are NaN or inf
  std::vector<float> counts;       // [task][k]
  std::vector<float> sums;         // [task][k][j], empty without sums
};
Partials search(const Problem& p, const ChunkPlan& plan, bool with_sums, int num_threads);

// 3. reduction: the partials added in chunk order into counts (G, K) and sums (G, K, d; may be
//    nullptr), and the perplexity; counts and sums are left unwritten when a value is not finite.
ForwardResult reduce(const Problem& p, const ChunkPlan& plan, const Partials& parts, float* counts, float* sums,
                     int num_threads);

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
