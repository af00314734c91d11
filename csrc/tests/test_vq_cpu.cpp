// The CPU VQ kernel's three steps, each against a plain scalar computation: planning (chunks by
// the problem only), search (nearest codes, ties to the lowest index, partials, NaN rows) and
// reduction (partials added in order, identical for any thread count; perplexity).
// Built and run by tests/test_cpp.py (csrc/tests/CMakeLists.txt); exit 0 when every check holds.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "../vq_cpu.h"

using namespace lapo::vq;

static int failures = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                          \
    }                                                                      \
  } while (0)

// A problem in LAPO's layout (x: (B, G, d, L) dense, dim-major per latent) or grouped (L = 1).
struct Case {
  int64_t B;
  int G, K, d, L;
  std::vector<float> x, out, codebook;
  std::vector<int64_t> idx;
  Problem problem() {
    const int64_t sb = static_cast<int64_t>(G) * d * L, sg = static_cast<int64_t>(d) * L, sk = L, sl = 1;
    return Problem{x.data(), out.data(), idx.data(), codebook.data(), B, G, K, d, L, sb, sg, sk, sl};
  }
};

static Case make(int64_t B, int G, int K, int d, int L, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Case c{B, G, K, d, L, {}, {}, {}, {}};
  c.x.resize(static_cast<size_t>(B) * G * d * L);
  c.out.resize(c.x.size());
  c.idx.resize(static_cast<size_t>(B) * G * L);
  c.codebook.resize(static_cast<size_t>(G) * K * d);
  for (auto& v : c.x) v = normal(rng);
  for (auto& v : c.codebook) v = normal(rng);
  return c;
}

static float x_at(const Case& c, int64_t b, int g, int j, int l) {
  return c.x[((b * c.G + g) * c.d + j) * c.L + l];
}

// The nearest code by a scalar double loop (ties to the lowest index).
static int nearest(const Case& c, int64_t b, int g, int l) {
  double best = std::numeric_limits<double>::infinity();
  int arg = 0;
  for (int k = 0; k < c.K; ++k) {
    double dist = 0;
    for (int j = 0; j < c.d; ++j) {
      const double diff = x_at(c, b, g, j, l) - c.codebook[(static_cast<size_t>(g) * c.K + k) * c.d + j];
      dist += diff * diff;
    }
    if (dist < best) best = dist, arg = k;
  }
  return arg;
}

static void test_planning() {
  Case small = make(128, 2, 64, 16, 4, 1), large = make(65536, 2, 64, 16, 4, 2);
  const ChunkPlan a = plan_chunks(small.problem()), b = plan_chunks(large.problem());
  CHECK(a.rows == 512 && a.chunks == 1 && a.tasks == 2 && a.lapo_blocks && !a.parallel);
  CHECK(b.rows == 262144 && b.chunks > 1 && b.tasks == b.chunks * 2 && b.parallel);
  CHECK(b.rows_per_chunk % 4 == 0 && b.chunks * b.rows_per_chunk >= b.rows);  // whole samples, every row
  CHECK((b.chunks - 1) * b.rows_per_chunk < b.rows);                          // no empty chunk
  CHECK(static_cast<size_t>(b.tasks) * 64 * 16 <= (size_t(4) << 20));          // partials within budget
  Case grouped = make(1000, 1, 1024, 64, 1, 3);
  const ChunkPlan c = plan_chunks(grouped.problem());
  CHECK(!c.lapo_blocks && c.rows == 1000);
}

static void test_search() {
  for (int L : {4, 1}) {
    Case c = make(300, 2, 64, 16, L, 4 + L);
    c.codebook[5 * 16] = c.codebook[7 * 16];  // a duplicate code: ties must keep the lower index
    for (int j = 0; j < 16; ++j) c.codebook[7 * 16 + j] = c.codebook[5 * 16 + j];
    const Problem p = c.problem();
    const ChunkPlan plan = plan_chunks(p);
    const Partials parts = search(p, plan, true, 2);
    double sq_err = 0;
    std::vector<double> counts(static_cast<size_t>(c.G) * c.K, 0);
    bool same = true;
    for (int64_t b = 0; b < c.B; ++b)
      for (int g = 0; g < c.G; ++g)
        for (int l = 0; l < c.L; ++l) {
          const int k = nearest(c, b, g, l);
          same &= c.idx[(b * c.G + g) * c.L + l] == k;
          counts[static_cast<size_t>(g) * c.K + k] += 1;
          for (int j = 0; j < c.d; ++j) {
            const double diff = x_at(c, b, g, j, l) - c.codebook[(static_cast<size_t>(g) * c.K + k) * c.d + j];
            sq_err += diff * diff;
            same &= c.out[((b * c.G + g) * c.d + j) * c.L + l] == c.codebook[(static_cast<size_t>(g) * c.K + k) * c.d + j];
          }
        }
    CHECK(same);
    double got_err = 0;
    for (double e : parts.sq_err) got_err += e;
    CHECK(std::fabs(got_err - sq_err) <= 1e-4 * sq_err);
    for (int g = 0; g < c.G; ++g)
      for (int k = 0; k < c.K; ++k) {
        double n = 0;
        for (int64_t ch = 0; ch < plan.chunks; ++ch) n += parts.counts[(g * plan.chunks + ch) * c.K + k];
        CHECK(n == counts[static_cast<size_t>(g) * c.K + k]);
      }
    CHECK(counts[7] == 0);  // the duplicate of code 5 is never chosen
  }
  Case bad = make(16, 2, 64, 16, 4, 9);
  bad.x[3] = std::numeric_limits<float>::quiet_NaN();
  bad.x[100] = std::numeric_limits<float>::infinity();
  const Problem p = bad.problem();
  const Partials parts = search(p, plan_chunks(p), false, 1);
  int64_t nonfinite = 0;
  for (int64_t n : parts.nonfinite) nonfinite += n;
  CHECK(nonfinite == 2 && parts.sums.empty());
}

static void test_reduction() {
  Case c = make(20000, 2, 64, 16, 4, 11);
  const Problem p = c.problem();
  const ChunkPlan plan = plan_chunks(p);
  CHECK(plan.chunks > 1);
  const Partials parts = search(p, plan, true, 2);
  std::vector<float> counts1(2 * 64), sums1(2 * 64 * 16), counts2(2 * 64), sums2(2 * 64 * 16);
  const ForwardResult one = reduce(p, plan, parts, counts1.data(), sums1.data(), 1);
  const ForwardResult two = reduce(p, plan, parts, counts2.data(), sums2.data(), 2);
  CHECK(counts1 == counts2 && sums1 == sums2 && one.perplexity == two.perplexity);  // bit for bit
  double perplexity = 0;
  for (int g = 0; g < 2; ++g) {
    double total = 0, entropy = 0;
    for (int k = 0; k < 64; ++k) total += counts1[g * 64 + k];
    CHECK(total == plan.rows);
    for (int k = 0; k < 64; ++k) {
      const double prob = counts1[g * 64 + k] / total;
      entropy -= prob * std::log(prob + 1e-10);
      float s = 0;  // the sums are the partials' sums, in chunk order
      for (int64_t ch = 0; ch < plan.chunks; ++ch) s += parts.sums[((g * plan.chunks + ch) * 64 + k) * 16];
      CHECK(s == sums1[(g * 64 + k) * 16]);
    }
    perplexity += std::exp(entropy);
  }
  CHECK(std::fabs(one.perplexity - perplexity) <= 1e-9 * perplexity);
  Partials poisoned = parts;
  poisoned.nonfinite[0] = 1;
  std::vector<float> untouched(2 * 64, -1.f);
  CHECK(reduce(p, plan, poisoned, untouched.data(), nullptr, 1).nonfinite == 1 && untouched[0] == -1.f);
}

int main() {
  test_planning();
  test_search();
  test_reduction();
  std::printf("%s: %d failure(s)\n", has_avx2() ? "avx2" : "portable", failures);
  return failures ? 1 : 0;
}
