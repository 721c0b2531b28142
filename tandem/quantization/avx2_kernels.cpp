// 4-bit and Q8_0 weights times 16-bit integer activations with AVX2's integer dot product
// (vpmaddwd).
// The layouts, the numbers behind them and the build: tandem/quantization/avx2_kernels.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kMaxRows = 8;

// x [M, K] float32 -> xi int16 [M, K] with one scale a row (|xi| <= 32767), and the float sum
// of each group of 32 of x (the zero term's factor). A row holding inf or NaN gets a NaN scale,
// so that its outputs are NaN as a float kernel's would be, never a wrapped integer.
void quantize_rows(const float* x, int64_t m, int64_t k, int16_t* xi, float* xs, float* gsum) {
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
    const bool finite = std::isfinite(amax);
    const float inv = finite && amax > 0.f ? 32767.f / amax : 0.f;
    xs[r] = finite ? amax / 32767.f : std::numeric_limits<float>::quiet_NaN();
    for (int64_t g = 0; g < k / kGroup; ++g) {
      float s = 0.f;
      for (int64_t i = g * kGroup; i < (g + 1) * kGroup; ++i) {
        s += row[i];
        xi[r * k + i] = static_cast<int16_t>(std::nearbyint(row[i] * inv));
      }
      gsum[r * (k / kGroup) + g] = s;
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weight formats: each 32-byte load of a row's codes unpacks to int16 vectors of 16 weights in
// the activations' own order, and covers whole groups of 32 (one scale, and maybe a min, each).
// Q4: 64 weights as 16 little-endian 16-bit lanes, nibble t of lane l being element 16t + l, so
// that four shifts and masks unpack it without a shuffle.
struct Q4 {
  static constexpr int64_t kWeights = 64, kBits = 4;
  static inline void unpack(const uint8_t* p, __m256i* w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i nibble = _mm256_set1_epi16(0x000F);
    w[0] = _mm256_and_si256(v, nibble);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 8), nibble);
    w[3] = _mm256_srli_epi16(v, 12);
  }
};

// Q8_0: 32 int8 codes in order (GGUF's blocks without their scale).
struct Q8 {
  static constexpr int64_t kWeights = 32, kBits = 8;
  static inline void unpack(const uint8_t* p, __m256i* w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w[0] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
    w[1] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
  }
};

// Rows [n0, n1) of y [M, N] for M <= kMaxRows, NB weight rows at a time: each (activation row,
// weight row) pair is one chain of dependent FMAs, and one chain alone waits on the FMA's latency.
// mins: null for a format without them.
template <class F, int M, int NB>
void rows_mm(const uint8_t* codes, const uint16_t* scale, const uint16_t* mins, const int16_t* xi,
             const float* xs, const float* gsum, float* y, int64_t n0, int64_t n1, int64_t k,
             int64_t n) {
  constexpr int64_t V = F::kWeights / 16, G = F::kWeights / kGroup;
  const int64_t groups = k / kGroup, row_bytes = k * F::kBits / 8;
  for (int64_t j0 = n0; j0 < n1; j0 += NB) {
    __m256 acc[NB][M];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < M; ++r) acc[b][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k / F::kWeights; ++c) {
      for (int b = 0; b < NB; ++b) {
        const int64_t j = j0 + b;
        __m256i w[V];
        F::unpack(codes + j * row_bytes + c * 32, w);
        __m256 sg[G];
        for (int64_t g = 0; g < G; ++g)
          sg[g] = _mm256_set1_ps(_cvtsh_ss(scale[j * groups + c * G + g]));
        for (int r = 0; r < M; ++r) {
          const __m256i* xr = reinterpret_cast<const __m256i*>(xi + r * k + c * F::kWeights);
          for (int64_t g = 0; g < G; ++g) {
            const __m256i d =
                _mm256_add_epi32(_mm256_madd_epi16(w[2 * g], _mm256_loadu_si256(xr + 2 * g)),
                                 _mm256_madd_epi16(w[2 * g + 1], _mm256_loadu_si256(xr + 2 * g + 1)));
            acc[b][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sg[g], acc[b][r]);
          }
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const int64_t j = j0 + b;
      for (int r = 0; r < M; ++r) {
        float z = 0.f;
        if (mins != nullptr) {
          // sum over groups of min * (sum of x over the group), in vectors too: a scalar loop
          // here is a chain of dependent adds as long as the chunk loop.
          const uint16_t* mn = mins + j * groups;
          const float* gs = gsum + r * groups;
          __m256 zv = _mm256_setzero_ps();
          int64_t g = 0;
          for (; g + 8 <= groups; g += 8)
            zv = _mm256_fmadd_ps(
                _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g))),
                _mm256_loadu_ps(gs + g), zv);
          for (; g < groups; ++g) z += _cvtsh_ss(mn[g]) * gs[g];
          z += hsum(zv);
        }
        y[r * n + j] = hsum(acc[b][r]) * xs[r] + z;
      }
    }
  }
}

using RowsFn = void (*)(const uint8_t*, const uint16_t*, const uint16_t*, const int16_t*,
                        const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
// One activation row takes four weight rows at a time (one FMA chain alone waits on latency);
// from two rows on, one weight row: the SmolLM2 LM head at two rows took 1.5 ms with two
// weight rows at a time and 0.8 ms with one (benchmarks/q8_head.py, AVX2 variables).
template <class F>
constexpr RowsFn kRows[kMaxRows] = {rows_mm<F, 1, 4>, rows_mm<F, 2, 1>, rows_mm<F, 3, 1>,
                                    rows_mm<F, 4, 1>, rows_mm<F, 5, 1>, rows_mm<F, 6, 1>,
                                    rows_mm<F, 7, 1>, rows_mm<F, 8, 1>};

// y = x @ w.T for x [M, K] float32 and a weight of N rows in format F; scale (and mins) float16
// [N, K / 32].
template <class F>
at::Tensor mm(const at::Tensor& x, const uint8_t* codes, const uint16_t* scale,
              const uint16_t* mins, int64_t n) {
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  const int64_t block = std::min(kMaxRows, m);  // rows quantized at a time: buffers for those
  std::vector<int16_t> xi(block * k);
  std::vector<float> xs(block), gsum(block * (k / kGroup));
  float* out = y.data_ptr<float>();
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, m - r0);
    quantize_rows(x.data_ptr<float>() + r0 * k, rows, k, xi.data(), xs.data(), gsum.data());
    const RowsFn fn = kRows<F>[rows - 1];
    // Threads take whole blocks of 16 weight rows, so every range is a multiple of NB.
    at::parallel_for(0, n / 16, 1, [&](int64_t b0, int64_t b1) {
      fn(codes, scale, mins, xi.data(), xs.data(), gsum.data(), out + r0 * n, b0 * 16, b1 * 16,
         k, n);
    });
  }
  return y;
}

void check_x(const at::Tensor& x, int64_t k, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: contiguous float32 [M, K]");
  TORCH_CHECK(x.size(1) == k, "codes: the weight has K = ", k, ", x has ", x.size(1));
  TORCH_CHECK(n % 16 == 0, "codes: N must be a multiple of 16");
}

const uint16_t* half_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>());
}

// x [M, K] float32; codes uint8 [N, K / 2] in Q4's layout; scale_min float16 [2, N, K / 32]:
// w = code * scale + min.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_min) {
  const int64_t n = codes.size(0), k = codes.size(1) * 2;
  check_x(x, k, n);
  TORCH_CHECK(codes.dim() == 2 && k % Q4::kWeights == 0 && codes.scalar_type() == at::kByte &&
                  codes.is_contiguous(), "codes: contiguous uint8 [N, K / 2], K a multiple of 64");
  TORCH_CHECK(scale_min.dim() == 3 && scale_min.size(0) == 2 && scale_min.size(1) == n &&
                  scale_min.size(2) == k / kGroup && scale_min.scalar_type() == at::kHalf &&
                  scale_min.is_contiguous(),
              "scale_min: contiguous float16 [2, N, K / 32]");
  const uint16_t* s = half_ptr(scale_min);
  return mm<Q4>(x, codes.data_ptr<uint8_t>(), s, s + n * (k / kGroup), n);
}

// x [M, K] float32; codes int8 [N, K]; scale float16 [N, K / 32]: w = code * scale (Q8_0).
at::Tensor q8_0_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  const int64_t n = codes.size(0), k = codes.size(1);
  check_x(x, k, n);
  TORCH_CHECK(codes.dim() == 2 && k % Q8::kWeights == 0 && codes.scalar_type() == at::kChar &&
                  codes.is_contiguous(), "codes: contiguous int8 [N, K], K a multiple of 32");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == k / kGroup &&
                  scale.scalar_type() == at::kHalf && scale.is_contiguous(),
              "scale: contiguous float16 [N, K / 32]");
  return mm<Q8>(x, reinterpret_cast<const uint8_t*>(codes.data_ptr<int8_t>()), half_ptr(scale),
                nullptr, n);
}

}  // namespace

TORCH_LIBRARY(tandem_cpu, lib) {
  lib.def("int4_mm(Tensor x, Tensor codes, Tensor scale_min) -> Tensor");
  lib.def("q8_0_mm(Tensor x, Tensor codes, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, lib) {
  lib.impl("int4_mm", int4_mm);
  lib.impl("q8_0_mm", q8_0_mm);
}
