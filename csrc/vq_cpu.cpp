#include "vq_cpu.h"

#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "thread_pool.h"

namespace lapo::vq {

namespace {

constexpr int kLanes = 8;                 // codes per AVX2 register
constexpr int kCodeBlock = 2 * kLanes;    // codes per micro-kernel step
constexpr int kRowBlock = 4;              // rows sharing each codebook load
constexpr double kMinTaskWork = 1 << 21;  // multiply-adds per task (rows * K * d): enough to amortise a hand-off
constexpr int64_t kMinRowsPerTask = 512;  // each task's partial sums (K*d) cost ~1/512 of its work
constexpr size_t kPartialBudget = size_t(4) << 20;  // floats of per-task partial sums, in all
constexpr size_t kTileFloats = 32768;     // codebook floats per cache tile (128 KB)
// rows*G*K*d below which one thread is faster for the whole op: at LAPO's B=128 a spinning worker
// costs the Python caller more than it saves (docs/experiments.md, "CPU VQ threading").
constexpr double kParallelWork = 1 << 21;
// Workers poll this long for the next call before sleeping (a wake-up costs more than a small call).
constexpr std::chrono::microseconds kSpin(200);

ThreadPool& pool(int num_threads) {
  // One pool per thread count, kept for the process: creating threads per call would cost more
  // than the search itself at LAPO's batch sizes. A forked child (e.g. a DataLoader worker)
  // inherits the pools but not their threads, so it builds its own and abandons the parent's.
  static std::mutex mutex;
  static std::vector<std::unique_ptr<ThreadPool>> pools;
  static pid_t owner = getpid();
  std::lock_guard<std::mutex> lock(mutex);
  if (getpid() != owner) {
    for (auto& p : pools) p.release();  // their threads do not exist here: never join them
    pools.clear();
    owner = getpid();
  }
  if (pools.size() <= static_cast<size_t>(num_threads)) pools.resize(num_threads + 1);
  if (!pools[num_threads]) pools[num_threads] = std::make_unique<ThreadPool>(num_threads, kSpin);
  return *pools[num_threads];
}

// The codebook of one group, cut into cache tiles of `tile` codes; each tile is stored
// transposed and contiguous, (d, width), so a scan streams through it (a whole-codebook transpose
// would put successive dims a power-of-two stride apart and thrash the cache sets). The tiles hold
// 2c, so a distance is ||c||^2 - x.(2c) with no scaled copy of x (doubling is exact in fp32: the
// same numbers as ||c||^2 - 2 x.c). Padding codes have +inf norm, so they never win.
struct PackedCodebook {
  int K, Kpad, d, tile;
  std::vector<float> ct;     // tile at k0 starts at k0 * d: [j * width + (k - k0)]
  std::vector<float> norms;  // [k]

  PackedCodebook(const float* codes, int K_, int d_)
      : K(K_), Kpad((K_ + kCodeBlock - 1) / kCodeBlock * kCodeBlock), d(d_),
        tile(std::max<int>(kCodeBlock, static_cast<int>(kTileFloats / d_) / kCodeBlock * kCodeBlock)),
        ct(static_cast<size_t>(d_) * Kpad, 0.f),
        norms(Kpad, std::numeric_limits<float>::infinity()) {
    for (int k = 0; k < K; ++k) {
      float s = 0.f;
      const int k0 = k / tile * tile, width = this->width(k0);
      for (int j = 0; j < d; ++j) {
        float c = codes[static_cast<size_t>(k) * d + j];
        ct[static_cast<size_t>(k0) * d + static_cast<size_t>(j) * width + (k - k0)] = 2.f * c;
        s += c * c;
      }
      norms[k] = s;
    }
  }
  int width(int k0) const { return std::min(tile, Kpad - k0); }
  float at(int j, int k) const {
    const int k0 = k / tile * tile;
    return ct[static_cast<size_t>(k0) * d + static_cast<size_t>(j) * width(k0) + (k - k0)];
  }
};

// Portable search of one row (d floats): dist = ||c||^2 - x.(2c).
int32_t nearest_portable(const PackedCodebook& cb, const float* x) {
  float best_val = std::numeric_limits<float>::infinity();
  int32_t best = 0;
  for (int k = 0; k < cb.K; ++k) {
    float acc = cb.norms[k];
    for (int j = 0; j < cb.d; ++j) acc -= x[j] * cb.at(j, k);
    if (acc < best_val) best_val = acc, best = k;
  }
  return best;
}

// R rows (x: R*d floats) against the tile of codes [k0, k0 + width),
// updating per-row, per-lane running minima (best_val/best_idx: R*8 each). Lanes see their codes
// in ascending order and replace only on strictly smaller distance, so ties keep the lowest index.
// D > 0 fixes d at compile time (fully unrolled dims, e.g. LAPO's 16); D == 0 reads cb.d.
template <int R, int D>
__attribute__((target("avx2,fma"))) void scan_avx2(const PackedCodebook& cb, const float* x,
                                                   int k0, float* best_val, int32_t* best_idx) {
  __m256 bv[R];
  __m256i bi[R];
  for (int r = 0; r < R; ++r) {
    bv[r] = _mm256_loadu_ps(best_val + r * kLanes);
    bi[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(best_idx + r * kLanes));
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const size_t stride = cb.width(k0);
  const float* tile = cb.ct.data() + static_cast<size_t>(k0) * cb.d;
  for (int kb = k0; kb < k0 + static_cast<int>(stride); kb += kCodeBlock) {
    __m256 acc0[R], acc1[R];
    const __m256 n0 = _mm256_loadu_ps(cb.norms.data() + kb);
    const __m256 n1 = _mm256_loadu_ps(cb.norms.data() + kb + kLanes);
    for (int r = 0; r < R; ++r) acc0[r] = n0, acc1[r] = n1;
    const float* col = tile + (kb - k0);
    const int d = D > 0 ? D : cb.d;
    for (int j = 0; j < d; ++j) {
      const __m256 c0 = _mm256_loadu_ps(col + j * stride);
      const __m256 c1 = _mm256_loadu_ps(col + j * stride + kLanes);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * d + j);
        acc0[r] = _mm256_fnmadd_ps(xv, c0, acc0[r]);
        acc1[r] = _mm256_fnmadd_ps(xv, c1, acc1[r]);
      }
    }
    const __m256i i0 = _mm256_add_epi32(lane, _mm256_set1_epi32(kb));
    const __m256i i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(kLanes));
    for (int r = 0; r < R; ++r) {
      __m256 lt = _mm256_cmp_ps(acc0[r], bv[r], _CMP_LT_OQ);
      bv[r] = _mm256_blendv_ps(bv[r], acc0[r], lt);
      bi[r] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi[r]), _mm256_castsi256_ps(i0), lt));
      lt = _mm256_cmp_ps(acc1[r], bv[r], _CMP_LT_OQ);
      bv[r] = _mm256_blendv_ps(bv[r], acc1[r], lt);
      bi[r] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi[r]), _mm256_castsi256_ps(i1), lt));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(best_val + r * kLanes, bv[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(best_idx + r * kLanes), bi[r]);
  }
}

}  // namespace

// The winning code of one row from its 8 per-lane minima: the smallest distance, and among lanes
// tied on it the lowest code index. Branch-free: a data-dependent scalar loop mispredicts a lot.
static __attribute__((target("avx2,fma"))) int32_t reduce_lanes(const float* val, const int32_t* idx) {
  const __m256 v = _mm256_loadu_ps(val);
  __m256 m = _mm256_min_ps(v, _mm256_permute2f128_ps(v, v, 1));
  m = _mm256_min_ps(m, _mm256_permute_ps(m, 0b01001110));
  m = _mm256_min_ps(m, _mm256_permute_ps(m, 0b10110001));
  const __m256 tied = _mm256_cmp_ps(v, m, _CMP_EQ_OQ);
  const __m256i none = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
  __m256i c = _mm256_castps_si256(_mm256_blendv_ps(
      _mm256_castsi256_ps(none), _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx))), tied));
  c = _mm256_min_epi32(c, _mm256_permute2x128_si256(c, c, 1));
  c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, 0b01001110));
  c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, 0b10110001));
  return _mm256_cvtsi256_si32(c);
}

bool has_avx2() {
  // __builtin_cpu_init is needed in a dlopen'ed extension: without it the feature bits libgcc
  // links into this .so may still be unset, and every CPU would look like it lacks AVX2.
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}

namespace {

// Per-thread working buffers, kept between calls so the hot loop neither allocates nor clears.
struct Scratch {
  std::vector<float> x, bv;
  std::vector<int32_t> bi, best;
  std::vector<int64_t> x_off, i_off;
  void resize(int n, int d) {
    const size_t nd = static_cast<size_t>(n) * d;
    if (x.size() < nd) x.resize(nd);
    if (best.size() < static_cast<size_t>(n)) {
      best.resize(n), x_off.resize(n), i_off.resize(n);
      bv.resize(static_cast<size_t>(n) * kLanes), bi.resize(static_cast<size_t>(n) * kLanes);
    }
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Nearest codes for `rows` rows (x: rows*d), cache-tiled over the codebook.
void nearest_rows(const PackedCodebook& cb, const float* x, int rows, int32_t* out, Scratch& sc) {
  if (!has_avx2()) {
    for (int r = 0; r < rows; ++r) out[r] = nearest_portable(cb, x + static_cast<size_t>(r) * cb.d);
    return;
  }
  float* bv = sc.bv.data();
  int32_t* bi = sc.bi.data();
  std::fill(bv, bv + static_cast<size_t>(rows) * kLanes, std::numeric_limits<float>::infinity());
  std::fill(bi, bi + static_cast<size_t>(rows) * kLanes, 0);
  const auto block = cb.d == 16 ? scan_avx2<kRowBlock, 16> : scan_avx2<kRowBlock, 0>;
  const auto single = cb.d == 16 ? scan_avx2<1, 16> : scan_avx2<1, 0>;
  for (int k0 = 0; k0 < cb.Kpad; k0 += cb.tile) {
    int r = 0;
    for (; r + kRowBlock <= rows; r += kRowBlock)
      block(cb, x + static_cast<size_t>(r) * cb.d, k0, &bv[r * kLanes], &bi[r * kLanes]);
    for (; r < rows; ++r)
      single(cb, x + static_cast<size_t>(r) * cb.d, k0, &bv[r * kLanes], &bi[r * kLanes]);
  }
  for (int r = 0; r < rows; ++r) out[r] = reduce_lanes(&bv[r * kLanes], &bi[r * kLanes]);
}

// Large outputs come from fresh mmap'ed memory (torch.empty -> malloc -> mmap above 32 MB), and
// faulting it in 4 KB pages can cost more than the search; where transparent huge pages are on
// "madvise", asking for them makes far fewer faults (docs/experiments.md, "CPU VQ threading").
void prefer_huge_pages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
}

// LAPO blocks: rows r..r+3 are latents 0..3 of one sample, whose dim j of latent l sits at
// x_off[r] + 4 j + l. Returns how many values are NaN or inf.
int64_t gather_lapo(const float* x, const int64_t* x_off, int n, float* xbuf) {
  const __m128i exponent = _mm_set1_epi32(0x7f800000);
  __m128i bad = _mm_setzero_si128();
  for (int r = 0; r < n; r += 4) {
    const float* src = x + x_off[r];
    float* dst = xbuf + static_cast<size_t>(r) * 16;
    for (int a = 0; a < 4; ++a) {  // dims 4a..4a+3 of the 4 latents: one 4x4 block
      __m128 r0 = _mm_loadu_ps(src + 16 * a), r1 = _mm_loadu_ps(src + 16 * a + 4);
      __m128 r2 = _mm_loadu_ps(src + 16 * a + 8), r3 = _mm_loadu_ps(src + 16 * a + 12);
      for (__m128 v : {r0, r1, r2, r3}) {
        const __m128i e = _mm_and_si128(_mm_castps_si128(v), exponent);
        bad = _mm_sub_epi32(bad, _mm_cmpeq_epi32(e, exponent));
      }
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(dst + 4 * a, r0);
      _mm_storeu_ps(dst + 16 + 4 * a, r1);
      _mm_storeu_ps(dst + 32 + 4 * a, r2);
      _mm_storeu_ps(dst + 48 + 4 * a, r3);
    }
  }
  alignas(16) int32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), bad);
  return static_cast<int64_t>(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
}

// The quantised rows back into LAPO blocks: the transpose of gather_lapo.
void scatter_lapo(const float* codes, const int32_t* best, const int64_t* x_off, int n, float* out) {
  for (int r = 0; r < n; r += 4) {
    const float* c0 = codes + static_cast<size_t>(best[r]) * 16;
    const float* c1 = codes + static_cast<size_t>(best[r + 1]) * 16;
    const float* c2 = codes + static_cast<size_t>(best[r + 2]) * 16;
    const float* c3 = codes + static_cast<size_t>(best[r + 3]) * 16;
    float* dst = out + x_off[r];
    for (int a = 0; a < 4; ++a) {
      __m128 r0 = _mm_loadu_ps(c0 + 4 * a), r1 = _mm_loadu_ps(c1 + 4 * a);
      __m128 r2 = _mm_loadu_ps(c2 + 4 * a), r3 = _mm_loadu_ps(c3 + 4 * a);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(dst + 16 * a, r0);
      _mm_storeu_ps(dst + 16 * a + 4, r1);
      _mm_storeu_ps(dst + 16 * a + 8, r2);
      _mm_storeu_ps(dst + 16 * a + 12, r3);
    }
  }
}

}  // namespace

ChunkPlan plan_chunks(const Problem& p) {
  ChunkPlan plan;
  plan.rows = p.batch * p.L;
  // Enough work per task to be worth a thread (by work, not rows: a large codebook gives few rows
  // much work), few enough chunks that the per-chunk partial sums stay within budget.
  const size_t code_floats = static_cast<size_t>(p.K) * p.d;
  const int64_t max_chunks = std::max<int64_t>(1, static_cast<int64_t>(kPartialBudget / code_floats / p.G));
  const auto min_rows = std::max(kMinRowsPerTask, static_cast<int64_t>(std::ceil(kMinTaskWork / static_cast<double>(code_floats))));
  plan.rows_per_chunk = std::max<int64_t>(min_rows, (plan.rows + max_chunks - 1) / max_chunks);
  // LAPO's view: a sample's 4 latents of 16 dims in a group are one dense 16x4 block (dim-major),
  // moved 4 rows at a time with 4x4 transposes instead of 64 strided scalar loads and stores.
  plan.lapo_blocks = p.d == 16 && p.L == 4 && p.stride_k == 4 && p.stride_l == 1;
  if (plan.lapo_blocks) plan.rows_per_chunk = (plan.rows_per_chunk + 3) / 4 * 4;  // chunks hold whole samples
  plan.chunks = std::max<int64_t>(1, (plan.rows + plan.rows_per_chunk - 1) / plan.rows_per_chunk);
  plan.tasks = static_cast<int>(plan.chunks * p.G);
  plan.parallel = static_cast<double>(plan.rows) * p.G * p.K * p.d >= kParallelWork;
  return plan;
}

namespace {

// Task t of the plan: group t / chunks, rows of chunk t % chunks. Its rows' nearest codes, the
// quantised output and indices, and its partials (squared error, non-finite count, per-code counts
// and, with sums, per-code sums of x).
void search_task(const Problem& p, const ChunkPlan& plan, const PackedCodebook& cb, int t, Partials& parts) {
  const int g = static_cast<int>(t / plan.chunks);
  const int64_t begin = (t % plan.chunks) * plan.rows_per_chunk, end = std::min(plan.rows, begin + plan.rows_per_chunk);
  const int n = static_cast<int>(end - begin);
  const int d = p.d;
  const size_t code_floats = static_cast<size_t>(p.K) * d;
  const float* codes = p.codebook + static_cast<size_t>(g) * code_floats;
  const bool lapo_blocks = plan.lapo_blocks;
  Scratch& sc = scratch();
  sc.resize(n, d);
  float* __restrict xbuf = sc.x.data();
  // Everything the loops read is copied to locals first: the int64 index stores below could
  // otherwise alias p's int64 fields and force a reload of each on every row.
  const float* __restrict x = p.x;
  float* __restrict out = p.out;
  int64_t* __restrict indices = p.indices;
  int64_t* __restrict x_off = sc.x_off.data();
  int64_t* __restrict i_off = sc.i_off.data();
  int32_t* __restrict best = sc.best.data();
  const int64_t sb = p.stride_b, sg = p.stride_g, sk = p.stride_k, sl = p.stride_l;
  const int L = p.L, G = p.G;
  // Walk (b, l) incrementally: no division per row.
  int64_t b = begin / L, l = begin % L;
  for (int r = 0; r < n; ++r) {
    x_off[r] = b * sb + g * sg + l * sl;
    i_off[r] = (b * G + g) * L + l;
    if (++l == L) l = 0, ++b;
  }
  int64_t bad;
  if (lapo_blocks) {
    bad = gather_lapo(x, x_off, n, xbuf);
  } else {
    bad = 0;
    for (int r = 0; r < n; ++r) {
      const float* __restrict src = x + x_off[r];
      float* __restrict xr = xbuf + static_cast<size_t>(r) * d;
      uint32_t nonfinite_bits = 0;  // an all-ones exponent marks NaN or inf
      for (int j = 0; j < d; ++j) {
        const float v = src[j * sk];
        xr[j] = v;
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        nonfinite_bits |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
      }
      bad += nonfinite_bits;
    }
  }
  nearest_rows(cb, xbuf, n, best, sc);

  float* __restrict cnt = parts.counts.data() + static_cast<size_t>(t) * p.K;
  float* __restrict sm = parts.sums.empty() ? nullptr : parts.sums.data() + static_cast<size_t>(t) * code_floats;
  if (lapo_blocks) scatter_lapo(codes, best, x_off, n, out);
  double err = 0.0;
  int64_t overflow = 0;  // rows whose distance to their code is not finite (|x| near 1e19 and up)
  for (int r = 0; r < n; ++r) {
    const int k = best[r];
    indices[i_off[r]] = k;
    const float* __restrict c = codes + static_cast<size_t>(k) * d;
    const float* __restrict xr = xbuf + static_cast<size_t>(r) * d;
    float row_err = 0.f;
#pragma omp simd reduction(+ : row_err)
    for (int j = 0; j < d; ++j) {
      const float diff = xr[j] - c[j];
      row_err += diff * diff;
    }
    err += row_err;
    overflow += !std::isfinite(row_err);
    if (!lapo_blocks) {
      float* __restrict o = out + x_off[r];
      for (int j = 0; j < d; ++j) o[j * sk] = c[j];
    }
    cnt[k] += 1.f;
    if (sm) {
      float* __restrict dst = sm + static_cast<size_t>(k) * d;
      for (int j = 0; j < d; ++j) dst[j] += xr[j];
    }
  }
  parts.sq_err[t] = err;
  // NaN/inf in x always makes its row's distance non-finite, so overflow counts those rows too.
  parts.nonfinite[t] = std::max(bad, overflow);
}

}  // namespace

Partials search(const Problem& p, const ChunkPlan& plan, bool with_sums, int num_threads) {
  if (p.stride_b == static_cast<int64_t>(p.G) * p.L * p.d)  // dense output: one extent to advise
    prefer_huge_pages(p.out, static_cast<size_t>(p.batch) * p.stride_b * sizeof(float));
  prefer_huge_pages(p.indices, static_cast<size_t>(plan.rows) * p.G * sizeof(int64_t));
  std::vector<PackedCodebook> packed;
  packed.reserve(p.G);
  for (int g = 0; g < p.G; ++g) packed.emplace_back(p.codebook + static_cast<size_t>(g) * p.K * p.d, p.K, p.d);
  Partials parts;
  parts.sq_err.assign(plan.tasks, 0.0);
  parts.nonfinite.assign(plan.tasks, 0);
  parts.counts.assign(static_cast<size_t>(plan.tasks) * p.K, 0.f);
  if (with_sums) parts.sums.assign(static_cast<size_t>(plan.tasks) * p.K * p.d, 0.f);
  pool(plan.parallel ? num_threads : 1).parallel_for(plan.tasks, [&](int t) {
    search_task(p, plan, packed[t / plan.chunks], t, parts);
  });
  return parts;
}

ForwardResult reduce(const Problem& p, const ChunkPlan& plan, const Partials& parts, float* counts, float* sums,
                     int num_threads) {
  ForwardResult result;
  for (int t = 0; t < plan.tasks; ++t) {
    result.sq_err += parts.sq_err[t];
    result.nonfinite += parts.nonfinite[t];
  }
  if (result.nonfinite) return result;
  // The chunks' partials added in chunk order, in parallel over (group, slice of codes).
  const size_t code_floats = static_cast<size_t>(p.K) * p.d;
  const int64_t chunks = plan.chunks;
  const int slices = std::min(p.K, 8);
  const int per_slice = (p.K + slices - 1) / slices;
  pool(plan.parallel ? num_threads : 1).parallel_for(p.G * slices, [&](int t) {
    const int g = t / slices;
    const int k0 = (t % slices) * per_slice, k1 = std::min(p.K, k0 + per_slice);
    for (int k = k0; k < k1; ++k) {
      float c = 0.f;
      for (int64_t ch = 0; ch < chunks; ++ch) c += parts.counts[static_cast<size_t>(g * chunks + ch) * p.K + k];
      counts[static_cast<size_t>(g) * p.K + k] = c;
      if (!sums) continue;
      float* dst = sums + (static_cast<size_t>(g) * p.K + k) * p.d;
      std::fill(dst, dst + p.d, 0.f);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const float* src = parts.sums.data() + static_cast<size_t>(g * chunks + ch) * code_floats + static_cast<size_t>(k) * p.d;
        for (int j = 0; j < p.d; ++j) dst[j] += src[j];
      }
    }
  });
  for (int g = 0; g < p.G; ++g) {
    double entropy = 0.0;
    for (int k = 0; k < p.K; ++k) {
      const double prob = plan.rows > 0 ? counts[static_cast<size_t>(g) * p.K + k] / static_cast<double>(plan.rows) : 0.0;
      entropy -= prob * std::log(prob + 1e-10);
    }
    result.perplexity += std::exp(entropy);
  }
  return result;
}

ForwardResult forward(const Problem& p, float* counts, float* sums, int num_threads, const EmaUpdate* update) {
  std::vector<float> own_counts, own_sums;
  if (!counts) {
    own_counts.resize(static_cast<size_t>(p.G) * p.K);
    counts = own_counts.data();
  }
  if (!sums && update) {
    own_sums.resize(static_cast<size_t>(p.G) * p.K * p.d);
    sums = own_sums.data();
  }
  const ChunkPlan plan = plan_chunks(p);
  const Partials parts = search(p, plan, sums != nullptr, num_threads);
  const ForwardResult result = reduce(p, plan, parts, counts, sums, num_threads);
  if (update && !result.nonfinite)
    ema_update(p.G, p.K, p.d, counts, sums, update->ema_count, update->ema_weight, update->codebook,
               update->decay, update->rate, update->eps);
  return result;
}

void ema_update(int G, int K, int d, const float* counts, const float* sums, float* ema_count,
                float* ema_weight, float* codebook, float decay, float rate, float eps) {
  for (int g = 0; g < G; ++g) {
    float* cnt = ema_count + static_cast<size_t>(g) * K;
    const float* batch_cnt = counts + static_cast<size_t>(g) * K;
    float total = 0.f;
    for (int k = 0; k < K; ++k) {
      cnt[k] = decay * cnt[k] + rate * batch_cnt[k];
      total += cnt[k];
    }
    for (int k = 0; k < K; ++k) cnt[k] = (cnt[k] + eps) / (total + K * eps) * total;
    const size_t base = static_cast<size_t>(g) * K * d;
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < d; ++j) {
        const size_t i = base + static_cast<size_t>(k) * d + j;
        ema_weight[i] = decay * ema_weight[i] + rate * sums[i];
        codebook[i] = ema_weight[i] / cnt[k];
      }
    }
  }
}

}  // namespace lapo::vq
