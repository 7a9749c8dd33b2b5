// The generation engine's other CPU kernels (bittern/engine on the CPU): the residual add and RMSNorm of a decoder
// block in one pass, the decode step's attention (rope, cache write, attention over the cached slots) in one call,
// and a 16-bit dense GEMV for the LM head. Eagerly, each replaces several PyTorch operators whose fixed cost per
// call dominates a decode step of one token.
//
// Numbers: the elementwise steps round exactly where the Hugging Face modules round (in the model's dtype, each
// product and sum computed in float32 and rounded once); the reductions (the norm's mean of squares, the attention's
// dot products and softmax, the GEMV's sums) run in float32 (the mean in double) in their own order, so they may
// differ from PyTorch's in the last bit, as PyTorch's own CPU kernels differ between instruction sets.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ternary_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#define BITTERN_X86 1
#include <immintrin.h>
#else
#define BITTERN_X86 0
#endif

namespace bittern_cpu {
namespace {

// Element types: float32, bfloat16 (as raw bits: the conversions vectorize) and float16.
struct F32 {
  using T = float;
  static inline float get(const T* p, int64_t i) { return p[i]; }
  static inline void put(T* p, int64_t i, float v) { p[i] = v; }
  static inline float round(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static inline float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline float get(const T* p, int64_t i) { return from_bits(uint32_t(p[i]) << 16); }
  // round to nearest even, as c10::BFloat16 (and Tensor.to) round; NaN as c10 writes it. Branch-free: vectorizes.
  static inline uint16_t bits(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
    return static_cast<uint16_t>(v != v ? 0x7FC0u : r);
  }
  static inline void put(T* p, int64_t i, float v) { p[i] = bits(v); }
  static inline float round(float v) { return from_bits(uint32_t(bits(v)) << 16); }
};
struct F16 {
  using T = c10::Half;
  static inline float get(const T* p, int64_t i) { return static_cast<float>(p[i]); }
  static inline void put(T* p, int64_t i, float v) { p[i] = c10::Half(v); }
  static inline float round(float v) { return static_cast<float>(c10::Half(v)); }
};

// Calls f(E{}) with the element traits of `dt`.
template <class F>
inline void with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::kBFloat16:
      return f(BF16{});
    case DType::kFloat16:
      return f(F16{});
    default:
      return f(F32{});
  }
}

inline float load(const void* p, DType dt, int64_t i) {
  float v = 0.0f;
  with_type(dt, [&](auto e) { v = decltype(e)::get(static_cast<const typename decltype(e)::T*>(p), i); });
  return v;
}

inline void put(void* p, DType dt, int64_t i, float v) {
  with_type(dt, [&](auto e) { decltype(e)::put(static_cast<typename decltype(e)::T*>(p), i, v); });
}

// ---- dense GEMV ------------------------------------------------------------------------------------------------

void dense_rows_scalar(const float* x, const void* w, DType wdt, int64_t k, int64_t r0, int64_t r1, float* acc) {
  for (int64_t r = r0; r < r1; ++r) {
    float s = 0.0f;
    for (int64_t j = 0; j < k; ++j) s += x[j] * load(w, wdt, r * k + j);
    acc[r - r0] = s;
  }
}

#if BITTERN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 load8w(const void* w, DType wdt, int64_t i) {
  if (wdt == DType::kBFloat16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if (wdt == DType::kFloat16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(w) + i);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kPrefetch = 1024;  // bytes

template <DType WDT>
void dense_rows_avx2_t(const float* x, const void* w, int64_t k, int64_t r0, int64_t r1, float* acc) {
  constexpr int R = 4;
  constexpr int64_t size = WDT == DType::kFloat32 ? 4 : 2;
  const int64_t k16 = k / 16 * 16;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    __m256 a[R][2];
    for (int i = 0; i < R; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k16; j += 16) {
      for (int i = 0; i < R; ++i)  // each row a little ahead: R streams in flight keep one core's bandwidth up
        _mm_prefetch(static_cast<const char*>(w) + ((r + i) * k + j) * size + kPrefetch, _MM_HINT_T0);
      const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
      for (int i = 0; i < R; ++i) {
        a[i][0] = _mm256_fmadd_ps(load8w(w, WDT, (r + i) * k + j), x0, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(load8w(w, WDT, (r + i) * k + j + 8), x1, a[i][1]);
      }
    }
    for (int i = 0; i < R; ++i) {
      float s = hsum8(_mm256_add_ps(a[i][0], a[i][1]));
      for (int64_t j = k16; j < k; ++j) s += x[j] * load(w, WDT, (r + i) * k + j);
      acc[r + i - r0] = s;
    }
  }
  for (; r < r1; ++r) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < k16; j += 16) {
      a0 = _mm256_fmadd_ps(load8w(w, WDT, r * k + j), _mm256_loadu_ps(x + j), a0);
      a1 = _mm256_fmadd_ps(load8w(w, WDT, r * k + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (int64_t j = k16; j < k; ++j) s += x[j] * load(w, WDT, r * k + j);
    acc[r - r0] = s;
  }
}

void dense_rows_avx2(const float* x, const void* w, DType wdt, int64_t k, int64_t r0, int64_t r1, float* acc) {
  switch (wdt) {
    case DType::kBFloat16:
      return dense_rows_avx2_t<DType::kBFloat16>(x, w, k, r0, r1, acc);
    case DType::kFloat16:
      return dense_rows_avx2_t<DType::kFloat16>(x, w, k, r0, r1, acc);
    default:
      return dense_rows_avx2_t<DType::kFloat32>(x, w, k, r0, r1, acc);
  }
}

#pragma GCC pop_options
#endif

}  // namespace

void dense_linear(const void* x, DType xdt, const void* w, DType wdt, const void* bias, DType bdt, void* y, DType ydt,
                  int64_t m, int64_t n, int64_t k) {
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = load(x, xdt, i);
#if BITTERN_X86
  const bool simd = current_isa() >= kAvx2;
#else
  const bool simd = false;
#endif
  constexpr int64_t kRows = 64;
  const int64_t blocks = (n + kRows - 1) / kRows;
  const int64_t least = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(kRows * k * m, 1));
  parallel_chunks(blocks, std::max(least, blocks / (8 * std::max<int64_t>(at::get_num_threads(), 1))),
                  [&](int64_t begin, int64_t end) {
    float acc[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kRows, r1 = std::min(n, r0 + kRows);
      for (int64_t t = 0; t < m; ++t) {
#if BITTERN_X86
        if (simd)
          dense_rows_avx2(xf.data() + t * k, w, wdt, k, r0, r1, acc);
        else
#endif
          dense_rows_scalar(xf.data() + t * k, w, wdt, k, r0, r1, acc);
        for (int64_t r = r0; r < r1; ++r) {
          put(y, ydt, t * n + r, bias ? acc[r - r0] + load(bias, bdt, r) : acc[r - r0]);
        }
      }
    }
  });
}

// ---- residual add + RMSNorm --------------------------------------------------------------------------------------

namespace {

// One row t of: h = x (+ residual, rounded to X; or relu(gate)^2 * x, each product rounded to X, BitNet's FFN),
// stored in s_out when given; y = w * (h * rsqrt(mean(h^2) + eps)).to(X), rounded to Y, written to y (as Y) and/or
// to yf (as the float32 value of that Y).
template <class X, class W, class Y>
void rms_norm_rows(const void* xv, const void* rv, const void* gv, void* sv, const void* wv, void* yv, float* yf,
                   int64_t m, int64_t d, float eps) {
  using XT = typename X::T;
  const XT* x = static_cast<const XT*>(xv);
  const XT* r = static_cast<const XT*>(rv);
  const XT* gate = static_cast<const XT*>(gv);
  XT* s_out = static_cast<XT*>(sv);
  const typename W::T* w = static_cast<const typename W::T*>(wv);
  typename Y::T* y = static_cast<typename Y::T*>(yv);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(d, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(static_cast<size_t>(d));
    for (int64_t t = begin; t < end; ++t) {
      const XT* xt = x + t * d;
      if (r) {
        const XT* rt = r + t * d;
        for (int64_t j = 0; j < d; ++j) s[j] = X::round(X::get(xt, j) + X::get(rt, j));  // x + residual in X
      } else if (gate) {
        const XT* gt = gate + t * d;
        for (int64_t j = 0; j < d; ++j) {
          const float g = X::get(gt, j);
          const float relu = g > 0.0f || g != g ? g : 0.0f;  // relu keeps NaN
          s[j] = X::round(X::round(relu * relu) * X::get(xt, j));
        }
      } else {
        for (int64_t j = 0; j < d; ++j) s[j] = X::get(xt, j);
      }
      if (s_out)
        for (int64_t j = 0; j < d; ++j) X::put(s_out + t * d, j, s[j]);
      float parts[16] = {};  // pow(2) in float32, summed in 16 interleaved parts (vectorized), then in double
      int64_t j = 0;
      for (; j + 16 <= d; j += 16)
        for (int l = 0; l < 16; ++l) parts[l] += s[j + l] * s[j + l];
      double squares = 0.0;
      for (; j < d; ++j) squares += static_cast<double>(s[j] * s[j]);
      for (float part : parts) squares += static_cast<double>(part);
      const float variance = static_cast<float>(squares) / static_cast<float>(d);
      const float inv = 1.0f / std::sqrt(variance + eps);  // torch.rsqrt on the CPU: 1 / sqrt, two roundings
      if (y) {
        typename Y::T* yt = y + t * d;
        for (int64_t i = 0; i < d; ++i) Y::put(yt, i, W::get(w, i) * X::round(s[i] * inv));  // .to(x dtype)
      }
      if (yf) {
        float* ft = yf + t * d;
        for (int64_t i = 0; i < d; ++i) ft[i] = Y::round(W::get(w, i) * X::round(s[i] * inv));
      }
    }
  });
}

template <class E>
void relu2_mul_rows(const void* gv, const void* uv, void* ov, int64_t n) {
  using T = typename E::T;
  const T* g = static_cast<const T*>(gv);
  const T* u = static_cast<const T*>(uv);
  T* o = static_cast<T*>(ov);
  at::parallel_for(0, n, int64_t(1) << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = E::get(g, i);
      const float relu = v > 0.0f || v != v ? v : 0.0f;  // relu keeps NaN
      E::put(o, i, E::round(relu * relu) * E::get(u, i));
    }
  });
}

}  // namespace

void rms_norm(const void* x, const void* residual, void* s_out, DType xdt, const void* weight, DType wdt, void* y,
              DType ydt, int64_t m, int64_t d, float eps) {
  with_type(xdt, [&](auto xe) {
    with_type(wdt, [&](auto we) {
      with_type(ydt, [&](auto ye) {
        rms_norm_rows<decltype(xe), decltype(we), decltype(ye)>(x, residual, nullptr, s_out, weight, y, nullptr, m, d,
                                                                eps);
      });
    });
  });
}

void rms_norm_quantize(const void* x, const void* residual, const void* gate, void* s_out, DType xdt,
                       const void* weight, DType wdt, DType ydt, float eps, const Quantized& q) {
  thread_local std::vector<float> normed;
  if (static_cast<int64_t>(normed.size()) < q.m * q.k) normed.resize(static_cast<size_t>(q.m * q.k));
  with_type(xdt, [&](auto xe) {
    with_type(wdt, [&](auto we) {
      with_type(ydt, [&](auto ye) {
        rms_norm_rows<decltype(xe), decltype(we), decltype(ye)>(x, residual, gate, s_out, weight, nullptr,
                                                                normed.data(), q.m, q.k, eps);
      });
    });
  });
  quantize(normed.data(), DType::kFloat32, q.k, q);  // the values y holds in its dtype, quantized as y would be
}

void relu2_mul(const void* gate, const void* up, void* out, DType dt, int64_t n) {
  with_type(dt, [&](auto e) { relu2_mul_rows<decltype(e)>(gate, up, out, n); });
}

// ---- the decode step's attention -----------------------------------------------------------------------------

namespace {

// out[g] = softmax_j(scale * qr[g] . key_j) . value_j over the slots j in [first, last], for the G query heads of one
// KV head; qr [G, d] float32 (roped), key / value rows `d` elements apart, `scores` room for last + 1 values per
// head. Portable version: float32 sums in 8 interleaved parts (the compiler vectorizes them without reassociating).
template <class E>
void attend_scalar(const float* qr, int64_t groups, int64_t d, const typename E::T* keys, const typename E::T* values,
                   int64_t first, int64_t last, float scale, float* scores, float* out) {
  const int64_t span = last + 1;
  for (int64_t g = 0; g < groups; ++g) {
    float* sc = scores + g * span;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = first; j <= last; ++j) {
      float parts[8] = {};
      const typename E::T* kr = keys + j * d;
      int64_t i = 0;
      for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; ++l) parts[l] += qr[g * d + i + l] * E::get(kr, i + l);
      for (; i < d; ++i) parts[0] += qr[g * d + i] * E::get(kr, i);
      float dot = 0.0f;
      for (float part : parts) dot += part;
      sc[j] = dot * scale;
      top = std::max(top, sc[j]);
    }
    float total = 0.0f;
    for (int64_t j = first; j <= last; ++j) {
      sc[j] = std::exp(sc[j] - top);
      total += sc[j];
    }
    float* o = out + g * d;
    std::fill(o, o + d, 0.0f);
    for (int64_t j = first; j <= last; ++j) {
      const float p = sc[j] / total;
      const typename E::T* vr = values + j * d;
      for (int64_t i = 0; i < d; ++i) o[i] += p * E::get(vr, i);
    }
  }
}

#if BITTERN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

template <class E>
inline __m256 load8(const typename E::T* p) {
  if constexpr (std::is_same_v<E, BF16>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (std::is_same_v<E, F16>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_ps(p);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp of 8 floats <= 0 (Cephes' expf: range reduction by ln 2, degree-5 polynomial; within 2 ulp; below -87
// the result is about 1e-38 rather than the exact tiny value, nothing next to the softmax's maximum's 1).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

// attend_scalar with 8-wide float32 vectors (d a multiple of 8).
template <class E>
void attend_avx2(const float* qr, int64_t groups, int64_t d, const typename E::T* keys, const typename E::T* values,
                 int64_t first, int64_t last, float scale, float* scores, float* out) {
  const int64_t span = last + 1;
  for (int64_t j = first; j <= last; ++j) {
    const typename E::T* kr = keys + j * d;
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = qr + g * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), load8<E>(kr + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i + 8), load8<E>(kr + i + 8), a1);
      }
      for (; i < d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), load8<E>(kr + i), a0);
      scores[g * span + j] = hsum(_mm256_add_ps(a0, a1)) * scale;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* sc = scores + g * span;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = first; j <= last; ++j) top = std::max(top, sc[j]);
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vtotal = _mm256_setzero_ps();
    int64_t j = first;
    for (; j + 8 <= span; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), vtop));
      _mm256_storeu_ps(sc + j, e);
      vtotal = _mm256_add_ps(vtotal, e);
    }
    float total = hsum(vtotal);
    for (; j < span; ++j) {
      sc[j] = std::exp(sc[j] - top);
      total += sc[j];
    }
    const float inv = 1.0f / total;
    for (j = first; j < span; ++j) sc[j] *= inv;
  }
  // out[g] = sum_j p[g][j] value_j, 64 dimensions at a time in 8 registers
  for (int64_t g = 0; g < groups; ++g) {
    const float* p = scores + g * span;
    float* o = out + g * d;
    int64_t i = 0;
    for (; i + 64 <= d; i += 64) {
      __m256 a[8];
      for (auto& v : a) v = _mm256_setzero_ps();
      for (int64_t j = first; j <= last; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const typename E::T* vr = values + j * d + i;
        for (int l = 0; l < 8; ++l) a[l] = _mm256_fmadd_ps(pj, load8<E>(vr + 8 * l), a[l]);
      }
      for (int l = 0; l < 8; ++l) _mm256_storeu_ps(o + i + 8 * l, a[l]);
    }
    for (; i < d; i += 8) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t j = first; j <= last; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8<E>(values + j * d + i), a);
      _mm256_storeu_ps(o + i, a);
    }
  }
}

#pragma GCC pop_options
#endif

template <class E>
void attention_rows(const AttentionArgs& a) {
  using T = typename E::T;
  const int64_t d = a.head_dim, half = d / 2;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* cos = static_cast<const T*>(a.cos);
  const T* sin = static_cast<const T*>(a.sin);
  T* keys = static_cast<T*>(a.keys);
  T* values = static_cast<T*>(a.values);
  T* out = static_cast<T*>(a.out);
#if BITTERN_X86
  const bool simd = current_isa() >= kAvx2 && d % 8 == 0;
#else
  const bool simd = false;
#endif
  at::parallel_for(0, a.batch * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qr(static_cast<size_t>(a.groups * d)), scores(static_cast<size_t>(a.groups * (a.slot + 1))),
        acc(static_cast<size_t>(a.groups * d));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.kv_heads;
      const int64_t pos = std::max<int64_t>(a.slot - a.pad[b], 0);
      const T* c = cos + pos * d;
      const T* s = sin + pos * d;
      // rope as the model computes it in its dtype: q * cos + rotate_half(q) * sin, each step rounded
      auto rope = [&](const T* src, int64_t j) {
        const float other = j < half ? -E::get(src, j + half) : E::get(src, j - half);
        return E::round(E::round(E::get(src, j) * E::get(c, j)) + E::round(other * E::get(s, j)));
      };
      const T* kh = k + bh * d;
      T* key_row = keys + (bh * a.cache_len + a.slot) * d;
      T* value_row = values + (bh * a.cache_len + a.slot) * d;
      for (int64_t j = 0; j < d; ++j) {
        E::put(key_row, j, rope(kh, j));
        value_row[j] = v[bh * d + j];
      }
      for (int64_t g = 0; g < a.groups; ++g)
        for (int64_t j = 0; j < d; ++j) qr[g * d + j] = rope(q + (bh * a.groups + g) * d, j);
      // the slots this row sees: from its first real one (the new one alone for a padding row) to the new one,
      // within the window
      int64_t first = std::min(a.pad[b], a.slot);
      if (a.window > 0) first = std::max(first, a.slot - a.window + 1);
      const T* kbase = keys + bh * a.cache_len * d;
      const T* vbase = values + bh * a.cache_len * d;
#if BITTERN_X86
      if (simd)
        attend_avx2<E>(qr.data(), a.groups, d, kbase, vbase, first, a.slot, a.scale, scores.data(), acc.data());
      else
#endif
        attend_scalar<E>(qr.data(), a.groups, d, kbase, vbase, first, a.slot, a.scale, scores.data(), acc.data());
      T* o = out + bh * a.groups * d;
      for (int64_t i = 0; i < a.groups * d; ++i) E::put(o, i, acc[i]);
    }
  });
}

}  // namespace

void decode_attention(const AttentionArgs& a) {
  with_type(a.dtype, [&](auto e) { attention_rows<decltype(e)>(a); });
}

}  // namespace bittern_cpu
