#include "vq_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "thread_pool.h"

namespace lapo::vq {

namespace {

constexpr int kLanes = 8;    // codes per AVX2 register
constexpr int kRowBlock = 4;  // rows searched together, sharing each codebook load
constexpr int64_t kRowsPerTask = 2048;

ThreadPool& pool(int num_threads) {
  // One pool per thread count, kept for the process: creating threads per call would cost more
  // than the search itself at LAPO's batch sizes.
  static std::mutex mutex;
  static std::vector<std::unique_ptr<ThreadPool>> pools;
  std::lock_guard<std::mutex> lock(mutex);
  if (pools.size() <= static_cast<size_t>(num_threads)) pools.resize(num_threads + 1);
  if (!pools[num_threads]) pools[num_threads] = std::make_unique<ThreadPool>(num_threads);
  return *pools[num_threads];
}

// The codebook of one group transposed to (d, Kpad) with ||c||^2 per code; padding codes have
// +inf norm, so they never win.
struct PackedCodebook {
  int K, Kpad, d;
  std::vector<float> ct;     // [j * Kpad + k]
  std::vector<float> norms;  // [k]

  PackedCodebook(const float* codes, int K_, int d_)
      : K(K_), Kpad((K_ + kLanes - 1) / kLanes * kLanes), d(d_),
        ct(static_cast<size_t>(d_) * Kpad, 0.f),
        norms(Kpad, std::numeric_limits<float>::infinity()) {
    for (int k = 0; k < K; ++k) {
      float s = 0.f;
      for (int j = 0; j < d; ++j) {
        float c = codes[static_cast<size_t>(k) * d + j];
        ct[static_cast<size_t>(j) * Kpad + k] = c;
        s += c * c;
      }
      norms[k] = s;
    }
  }
};

// Nearest code for R rows (each d contiguous floats in rows[r*d..]): dist = ||c||^2 - 2 x.c.
template <int R>
void nearest_portable(const PackedCodebook& cb, const float* rows, int32_t* best) {
  float best_val[R];
  for (int r = 0; r < R; ++r) {
    best_val[r] = std::numeric_limits<float>::infinity();
    best[r] = 0;
  }
  for (int k = 0; k < cb.K; ++k) {
    float acc[R];
    for (int r = 0; r < R; ++r) acc[r] = cb.norms[k];
    for (int j = 0; j < cb.d; ++j) {
      float c = cb.ct[static_cast<size_t>(j) * cb.Kpad + k];
      for (int r = 0; r < R; ++r) acc[r] -= 2.f * rows[r * cb.d + j] * c;
    }
    for (int r = 0; r < R; ++r)
      if (acc[r] < best_val[r]) best_val[r] = acc[r], best[r] = k;
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void nearest_avx2(const PackedCodebook& cb, const float* rows,
                                                      int32_t* best) {
  __m256 best_val[R];
  __m256i best_idx[R];
  for (int r = 0; r < R; ++r) {
    best_val[r] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    best_idx[r] = _mm256_setzero_si256();
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int kb = 0; kb < cb.Kpad; kb += kLanes) {
    __m256 acc[R];
    const __m256 norm = _mm256_loadu_ps(cb.norms.data() + kb);
    for (int r = 0; r < R; ++r) acc[r] = norm;
    const float* col = cb.ct.data() + kb;
    for (int j = 0; j < cb.d; ++j) {
      const __m256 c = _mm256_loadu_ps(col + static_cast<size_t>(j) * cb.Kpad);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(2.f * rows[r * cb.d + j]), c, acc[r]);
    }
    const __m256i idx = _mm256_add_epi32(lane, _mm256_set1_epi32(kb));
    for (int r = 0; r < R; ++r) {
      // Strictly less: each lane keeps the first (lowest) code among equal distances.
      const __m256 lt = _mm256_cmp_ps(acc[r], best_val[r], _CMP_LT_OQ);
      best_val[r] = _mm256_blendv_ps(best_val[r], acc[r], lt);
      best_idx[r] = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(best_idx[r]), _mm256_castsi256_ps(idx), lt));
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float v[kLanes];
    alignas(32) int32_t ix[kLanes];
    _mm256_store_ps(v, best_val[r]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ix), best_idx[r]);
    int b = 0;
    for (int i = 1; i < kLanes; ++i)
      if (v[i] < v[b] || (v[i] == v[b] && ix[i] < ix[b])) b = i;
    best[r] = ix[b];
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

template <int R>
void nearest(const PackedCodebook& cb, const float* rows, int32_t* best) {
  if (has_avx2()) {
    nearest_avx2<R>(cb, rows, best);
  } else {
    nearest_portable<R>(cb, rows, best);
  }
}

inline int64_t x_offset(const Problem& p, int g, int64_t n) {
  const int64_t b = n / p.L, l = n % p.L;
  return b * p.stride_b + g * p.stride_g + l * p.stride_l;
}

inline int64_t index_offset(const Problem& p, int g, int64_t n) {
  const int64_t b = n / p.L, l = n % p.L;
  return (b * p.G + g) * p.L + l;
}

// Copies row n of group g into dst (d floats); returns false if any value is not finite.
inline bool gather_row(const Problem& p, int g, int64_t n, float* dst) {
  const float* src = p.x + x_offset(p, g, n);
  bool finite = true;
  for (int j = 0; j < p.d; ++j) {
    dst[j] = src[j * p.stride_k];
    finite &= std::isfinite(dst[j]);
  }
  return finite;
}

}  // namespace

SearchResult search(const Problem& p, int num_threads) {
  const int64_t rows = p.batch * p.L;
  std::vector<PackedCodebook> packed;
  packed.reserve(p.G);
  for (int g = 0; g < p.G; ++g) packed.emplace_back(p.codebook + static_cast<size_t>(g) * p.K * p.d, p.K, p.d);

  const int64_t chunks = std::max<int64_t>(1, (rows + kRowsPerTask - 1) / kRowsPerTask);
  const int tasks = static_cast<int>(chunks * p.G);
  std::vector<double> sq_err(tasks, 0.0);
  std::vector<int64_t> nonfinite(tasks, 0);

  pool(num_threads).parallel_for(tasks, [&](int t) {
    const int g = static_cast<int>(t / chunks);
    const int64_t begin = (t % chunks) * kRowsPerTask, end = std::min(rows, begin + kRowsPerTask);
    const PackedCodebook& cb = packed[g];
    const float* codes = p.codebook + static_cast<size_t>(g) * p.K * p.d;
    std::vector<float> buf(static_cast<size_t>(kRowBlock) * p.d);
    double err = 0.0;
    int64_t bad = 0;
    for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
      const int r_count = static_cast<int>(std::min<int64_t>(kRowBlock, end - n0));
      bool finite[kRowBlock];
      for (int r = 0; r < r_count; ++r) finite[r] = gather_row(p, g, n0 + r, buf.data() + r * p.d);
      int32_t best[kRowBlock];
      if (r_count == kRowBlock) {
        nearest<kRowBlock>(cb, buf.data(), best);
      } else {
        for (int r = 0; r < r_count; ++r) nearest<1>(cb, buf.data() + r * p.d, best + r);
      }
      for (int r = 0; r < r_count; ++r) {
        const int64_t n = n0 + r;
        bad += !finite[r];
        p.indices[index_offset(p, g, n)] = best[r];
        const float* c = codes + static_cast<size_t>(best[r]) * p.d;
        float* o = p.out + x_offset(p, g, n);
        const float* xr = buf.data() + r * p.d;
        for (int j = 0; j < p.d; ++j) {
          o[j * p.stride_k] = c[j];
          const double diff = static_cast<double>(xr[j]) - c[j];
          err += diff * diff;
        }
      }
    }
    sq_err[t] = err;
    nonfinite[t] = bad;
  });

  SearchResult result;
  for (int t = 0; t < tasks; ++t) {
    result.sq_err += sq_err[t];
    result.nonfinite += nonfinite[t];
  }
  return result;
}

double accumulate(const Problem& p, float* counts, float* sums, int num_threads) {
  const int64_t rows = p.batch * p.L;
  // Each task owns a range of codes of one group and scans all of that group's rows in order,
  // so every code's sums are added in row order, whatever the thread count.
  const int ranges = std::min(p.K, 8);
  const int per_range = (p.K + ranges - 1) / ranges;
  std::fill(counts, counts + static_cast<size_t>(p.G) * p.K, 0.f);
  if (sums) std::fill(sums, sums + static_cast<size_t>(p.G) * p.K * p.d, 0.f);

  pool(num_threads).parallel_for(p.G * ranges, [&](int t) {
    const int g = t / ranges;
    const int k0 = (t % ranges) * per_range, k1 = std::min(p.K, k0 + per_range);
    float* cnt = counts + static_cast<size_t>(g) * p.K;
    float* sm = sums ? sums + static_cast<size_t>(g) * p.K * p.d : nullptr;
    for (int64_t n = 0; n < rows; ++n) {
      const int64_t k = p.indices[index_offset(p, g, n)];
      if (k < k0 || k >= k1) continue;
      cnt[k] += 1.f;
      if (sm) {
        const float* src = p.x + x_offset(p, g, n);
        float* dst = sm + k * p.d;
        for (int j = 0; j < p.d; ++j) dst[j] += src[j * p.stride_k];
      }
    }
  });

  double perplexity = 0.0;
  for (int g = 0; g < p.G; ++g) {
    double entropy = 0.0;
    for (int k = 0; k < p.K; ++k) {
      const double prob = rows > 0 ? counts[static_cast<size_t>(g) * p.K + k] / static_cast<double>(rows) : 0.0;
      entropy -= prob * std::log(prob + 1e-10);
    }
    perplexity += std::exp(entropy);
  }
  return perplexity;
}

void ema_update(int G, int K, int d, const float* counts, const float* sums, float* ema_count,
                float* ema_weight, float* codebook, float decay, float eps) {
  for (int g = 0; g < G; ++g) {
    float* cnt = ema_count + static_cast<size_t>(g) * K;
    const float* batch_cnt = counts + static_cast<size_t>(g) * K;
    float total = 0.f;
    for (int k = 0; k < K; ++k) {
      cnt[k] = decay * cnt[k] + (1.f - decay) * batch_cnt[k];
      total += cnt[k];
    }
    for (int k = 0; k < K; ++k) cnt[k] = (cnt[k] + eps) / (total + K * eps) * total;
    const size_t base = static_cast<size_t>(g) * K * d;
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < d; ++j) {
        const size_t i = base + static_cast<size_t>(k) * d + j;
        ema_weight[i] = decay * ema_weight[i] + (1.f - decay) * sums[i];
        codebook[i] = ema_weight[i] / cnt[k];
      }
    }
  }
}

}  // namespace lapo::vq
