// bittern's native CPU kernels for the ternary linear layer: activation quantization and the int8 x 2-bit product,
// for every instruction set of ternary_cpu.h, chosen at run time. See ternary_cpu.h for the arithmetic and
// ternary_cpu_simd.inc for the SIMD product.
//
// Compiled by bittern/kernels/cpu.py with -ffp-contract=off and without -ffast-math: the float steps (the
// reciprocal, the products of scales, the division, the bias) are single IEEE operations, exactly as PyTorch
// evaluates the reference. Only ATen/Parallel.h (and c10's 16-bit float types) come from PyTorch: at::parallel_for
// runs the work on torch's intra-op thread pool, so torch.set_num_threads applies.

#include "ternary_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#define BITTERN_X86 1
#include <immintrin.h>
#else
#define BITTERN_X86 0
#endif

namespace bittern_cpu {
namespace {

constexpr int kMaxLayers = 8;
// The least work (weight bytes x tokens) worth a thread of its own.
constexpr int64_t kMinBytesPerThread = int64_t(1) << 16;
constexpr float kEps = 1e-5f;  // bittern.quant.EPS, as float32 (torch.clamp rounds the bound to the tensor dtype)
constexpr float kActMax = 127.0f;
// The widest K whose sums of fields masked in place (up to 3 << 6 times |x| <= 128) fit in int32.
constexpr int64_t kMaxInPlaceK = 87381;
// Tokens whose int32 sums are held at once (longer prompts run in pieces of this many).
constexpr int64_t kStageTokens = 256;

inline float activation_scale(float amax) { return (1.0f / std::max(amax, kEps)) * kActMax; }

inline float load_float(const void* x, DType dtype, int64_t i) {
  if (dtype == DType::kBFloat16) return static_cast<float>(static_cast<const c10::BFloat16*>(x)[i]);
  return static_cast<const float*>(x)[i];
}

inline void store(void* out, DType dtype, int64_t i, float y) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(out)[i] = y;
      break;
    case DType::kBFloat16:
      static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(y);  // round to nearest even, as Tensor.to
      break;
    case DType::kFloat16:
      static_cast<c10::Half*>(out)[i] = c10::Half(y);
      break;
  }
}

// Keep the sums of `g` byte rows from `row` of layer L, tokens [t0, t1), in L.stage:
// sums[(t - t0) * g + i][f] is sum_k (code + 1) x_k of output row + i + f * rows.
inline void collect(const Layer& L, int64_t row, int g, int64_t t0, int64_t t1, const int32_t (*sums)[4]) {
  for (int64_t t = t0; t < t1; ++t)
    for (int i = 0; i < g; ++i)
      for (int f = 0; f < 4; ++f) {
        const int64_t n = row + i + f * L.rows;
        if (n < L.n) L.stage[t * L.n + n] = sums[(t - t0) * g + i][f];
      }
}

// y = (stage - rowsum) / (s_w * s_x) [+ bias] of outputs [n0, n1) of layer L, every token: the product of the two
// scales, one IEEE division, the bias, the output dtype.
void rescale_scalar(const Quantized& q, const Layer& L, int64_t n0, int64_t n1, DType out) {
  for (int64_t t = 0; t < q.m; ++t) {
    const float sx = q.scale[t];
    for (int64_t n = n0; n < n1; ++n) {
      const int32_t acc = L.stage[t * L.n + n] - q.rowsum[t];
      const float d = (L.per_row ? L.scale[n] : L.scale[0]) * sx;
      float y = static_cast<float>(acc) / d;
      if (L.bias) y = y + L.bias[n];
      store(L.out, out, t * L.n + n, y);
    }
  }
}

// The outputs of byte rows [r0, r1) of layer L: 4 contiguous ranges, one per 2-bit field.
template <class Rescale>
void rescale_rows(const Quantized& q, const Layer& L, int64_t r0, int64_t r1, DType out, Rescale rescale) {
  for (int f = 0; f < 4; ++f) {
    const int64_t n0 = r0 + f * L.rows, n1 = std::min(L.n, r1 + f * L.rows);
    if (n0 < n1) rescale(q, L, n0, n1, out);
  }
}

// ---- portable C++ ------------------------------------------------------------------------------------------

namespace scalar {

void quantize_row(const void* x, DType dtype, int64_t k, int8_t* out, int64_t kp, float* scale, int32_t* rowsum) {
  float amax = 0.0f;
  for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::fabs(load_float(x, dtype, j)));
  const float s = activation_scale(amax);
  int32_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    const float v = std::min(std::max(std::nearbyint(load_float(x, dtype, j) * s), -128.0f), 127.0f);
    out[j] = static_cast<int8_t>(v);
    total += static_cast<int32_t>(v);
  }
  std::memset(out + k, 0, static_cast<size_t>(kp - k));
  *scale = s;
  *rowsum = total;
}

void linear_impl(const Quantized& q, const Layer* layers, int count, DType out) {
  for (int i = 0; i < count; ++i) {
    const Layer& L = layers[i];
    const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(q.k * q.m, 1));
    at::parallel_for(0, L.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* w = L.packed + r * q.k;
        for (int64_t t = 0; t < q.m; ++t) {
          const int8_t* x = q.xq + t * q.kp;
          int32_t s[4] = {0, 0, 0, 0};
          for (int64_t j = 0; j < q.k; ++j) {
            const int32_t xv = x[j];
            const uint32_t b = w[j];
            s[0] += static_cast<int32_t>(b & 3) * xv;
            s[1] += static_cast<int32_t>((b >> 2) & 3) * xv;
            s[2] += static_cast<int32_t>((b >> 4) & 3) * xv;
            s[3] += static_cast<int32_t>(b >> 6) * xv;
          }
          const int32_t sums[1][4] = {{s[0], s[1], s[2], s[3]}};
          collect(L, r, 1, t, t + 1, sums);
        }
      }
      rescale_rows(q, L, begin, end, out, rescale_scalar);
    });
  }
}

}  // namespace scalar

#if BITTERN_X86

// ---- AVX2: activation quantization (every x86 SIMD level uses it) and the vpmaddubsw product ----------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace avx2 {

inline __m256 load8(const void* x, DType dtype, int64_t i) {
  if (dtype == DType::kBFloat16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(x) + i);
}

void quantize_row(const void* x, DType dtype, int64_t k, int8_t* out, int64_t kp, float* scale, int32_t* rowsum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8(x, dtype, j), abs_mask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; j < k; ++j) amax = std::max(amax, std::fabs(load_float(x, dtype, j)));
  const float s = activation_scale(amax);

  const __m256 vs = _mm256_set1_ps(s);
  const __m256 lo = _mm256_set1_ps(-128.0f);
  const __m256 hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  auto codes8 = [&](int64_t i) {
    const __m256 v = _mm256_round_ps(_mm256_mul_ps(load8(x, dtype, i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
  };
  j = 0;
  for (; j + 32 <= k; j += 32) {
    const __m256i i0 = codes8(j), i1 = codes8(j + 8), i2 = codes8(j + 16), i3 = codes8(j + 24);
    vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    // packs interleave the 128-bit lanes: dwords [i0 lo, i1 lo, i2 lo, i3 lo, i0 hi, ...] -> put them in order
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permutevar8x32_epi32(packed, order));
  }
  alignas(32) int32_t sums[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), vsum);
  int32_t total = 0;
  for (int32_t v : sums) total += v;
  for (; j < k; ++j) {
    const float v = std::min(std::max(std::nearbyint(load_float(x, dtype, j) * s), -128.0f), 127.0f);
    out[j] = static_cast<int8_t>(v);
    total += static_cast<int32_t>(v);
  }
  std::memset(out + k, 0, static_cast<size_t>(kp - k));
  *scale = s;
  *rowsum = total;
}

// rescale_scalar, 8 outputs at a time (the same IEEE steps: vcvtdq2ps, vmulps, vdivps, vaddps).
void rescale(const Quantized& q, const Layer& L, int64_t n0, int64_t n1, DType out) {
  for (int64_t t = 0; t < q.m; ++t) {
    const float sx = q.scale[t];
    const __m256 vsx = _mm256_set1_ps(sx);
    const __m256 vd = _mm256_set1_ps(L.scale[0] * sx);
    const __m256i vrowsum = _mm256_set1_epi32(q.rowsum[t]);
    const int32_t* stage = L.stage + t * L.n;
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) {
      const __m256i acc = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(stage + n)), vrowsum);
      const __m256 d = L.per_row ? _mm256_mul_ps(_mm256_loadu_ps(L.scale + n), vsx) : vd;
      __m256 y = _mm256_div_ps(_mm256_cvtepi32_ps(acc), d);
      if (L.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(L.bias + n));
      const int64_t at = t * L.n + n;
      if (out == DType::kFloat32) {
        _mm256_storeu_ps(static_cast<float*>(L.out) + at, y);
      } else if (out == DType::kBFloat16) {  // round to nearest even; NaN as c10::BFloat16 writes it
        const __m256i u = _mm256_castps_si256(y);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(L.out) + at),
                         _mm256_castsi256_si128(packed));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(L.out) + at),
                         _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
    }
    if (n < n1) {
      const Quantized one{q.xq + t * q.kp, q.scale + t, q.rowsum + t, 1, q.k, q.kp};
      Layer rest = L;
      rest.stage = L.stage + t * L.n;
      rest.out = static_cast<char*>(L.out) + t * L.n * (out == DType::kFloat32 ? 4 : 2);
      rescale_scalar(one, rest, n, n1, out);
    }
  }
}

struct V {
  using I = __m256i;
  static constexpr int B = 32;
  static constexpr bool kFieldsInPlace = false;
  static inline I load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static inline I zero() { return _mm256_setzero_si256(); }
  static inline I set1(char v) { return _mm256_set1_epi8(v); }
  template <int S>
  static inline I field(I w, I m3) {
    return _mm256_and_si256(S ? _mm256_srli_epi16(w, S) : w, m3);
  }
  static inline I dot(I acc, I c, I x) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(c, x)); }
  static inline I widen(I acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
  static inline I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static inline I fold4(I a, I b, I c, I d) {
    const I ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    const I cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
  }
  static inline void total4(I f, int32_t* out) {
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(f), _mm256_extracti128_si256(f, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), s);
  }
};

#include "ternary_cpu_simd.inc"

}  // namespace avx2

#pragma GCC pop_options

// ---- AVX-VNNI: 256-bit vpdpbusd (VEX) ----------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")

namespace avxvnni {

struct V : avx2::V {
  static constexpr bool kFieldsInPlace = true;
  template <int S>
  static inline I field(I w, I) {
    return _mm256_and_si256(w, _mm256_set1_epi8(static_cast<char>(3 << S)));
  }
  static inline I dot(I acc, I c, I x) { return _mm256_dpbusd_avx_epi32(acc, c, x); }
  static inline I widen(I acc) { return acc; }
};

#include "ternary_cpu_simd.inc"

}  // namespace avxvnni

#pragma GCC pop_options

// ---- AVX-512 VNNI: 512-bit vpdpbusd -------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")

namespace avx512vnni {

struct V {
  using I = __m512i;
  static constexpr int B = 64;
  static constexpr bool kFieldsInPlace = true;
  static inline I load(const void* p) { return _mm512_loadu_si512(p); }
  static inline I zero() { return _mm512_setzero_si512(); }
  static inline I set1(char v) { return _mm512_set1_epi8(v); }
  template <int S>
  static inline I field(I w, I) {
    return _mm512_and_si512(w, _mm512_set1_epi8(static_cast<char>(3 << S)));
  }
  static inline I dot(I acc, I c, I x) { return _mm512_dpbusd_epi32(acc, c, x); }
  static inline I widen(I acc) { return acc; }
  static inline I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static inline I fold4(I a, I b, I c, I d) {
    const I ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const I cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  }
  static inline void total4(I f, int32_t* out) {
    const __m128i s = _mm_add_epi32(_mm_add_epi32(_mm512_extracti32x4_epi32(f, 0), _mm512_extracti32x4_epi32(f, 1)),
                                    _mm_add_epi32(_mm512_extracti32x4_epi32(f, 2), _mm512_extracti32x4_epi32(f, 3)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), s);
  }
};

#include "ternary_cpu_simd.inc"

}  // namespace avx512vnni

#pragma GCC pop_options

#endif  // BITTERN_X86

int detect() {
  int isas = 1 << kScalar;
#if BITTERN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    isas |= 1 << kAvx2;
    if (__builtin_cpu_supports("avxvnni")) isas |= 1 << kAvxVnni;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      isas |= 1 << kAvx512Vnni;
  }
#endif
  return isas;
}

int best(int isas, int limit) {
  for (int i = std::min(limit, kIsaCount - 1); i > kScalar; --i)
    if (isas & (1 << i)) return i;
  return kScalar;
}

const int kSupported = detect();
std::atomic<int> g_isa{best(kSupported, kIsaCount - 1)};

}  // namespace

int supported_isas() { return kSupported; }
int current_isa() { return g_isa.load(std::memory_order_relaxed); }
int set_isa(int isa) {
  g_isa.store(best(kSupported, isa < 0 ? kIsaCount - 1 : isa), std::memory_order_relaxed);
  return current_isa();
}

int parallel_threads(int64_t n) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen |= uint64_t(1) << (at::get_thread_num() & 63); });
  return __builtin_popcountll(seen.load());
}

void quantize(const void* x, DType dtype, int64_t stride, const Quantized& q) {
  const size_t width = dtype == DType::kBFloat16 ? 2 : 4;
  const int isa = current_isa();
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(q.k, 1));
  at::parallel_for(0, q.m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const void* row = static_cast<const char*>(x) + t * stride * static_cast<int64_t>(width);
      int8_t* out = q.xq + t * q.kp;
#if BITTERN_X86
      if (isa >= kAvx2) {
        avx2::quantize_row(row, dtype, q.k, out, q.kp, q.scale + t, q.rowsum + t);
        continue;
      }
#endif
      scalar::quantize_row(row, dtype, q.k, out, q.kp, q.scale + t, q.rowsum + t);
    }
  });
}

void prepare(const int8_t* xq, const float* scale, const Quantized& q) {
  for (int64_t t = 0; t < q.m; ++t) {
    const int8_t* in = xq + t * q.k;
    int8_t* out = q.xq + t * q.kp;
    int32_t total = 0;
    for (int64_t j = 0; j < q.k; ++j) total += in[j];
    std::memcpy(out, in, static_cast<size_t>(q.k));
    std::memset(out + q.k, 0, static_cast<size_t>(q.kp - q.k));
    q.scale[t] = scale[t];
    q.rowsum[t] = total;
  }
}

void linear(const Quantized& q, const Layer* layers, int count, DType out) {
  if (count > kMaxLayers) {
    for (int i = 0; i < count; i += kMaxLayers) linear(q, layers + i, std::min(kMaxLayers, count - i), out);
    return;
  }
  const int64_t width = out == DType::kFloat32 ? 4 : 2;
  if (q.m > kStageTokens) {  // long prompts in pieces: the int32 sums of a piece at a time
    for (int64_t t0 = 0; t0 < q.m; t0 += kStageTokens) {
      const Quantized piece{q.xq + t0 * q.kp, q.scale + t0, q.rowsum + t0, std::min(kStageTokens, q.m - t0), q.k, q.kp};
      Layer moved[kMaxLayers];
      for (int i = 0; i < count; ++i) {
        moved[i] = layers[i];
        moved[i].out = static_cast<char*>(layers[i].out) + t0 * layers[i].n * width;
      }
      linear(piece, moved, count, out);
    }
    return;
  }
  // int32 sums of every output, rescaled by each thread once its rows are done (in a buffer of the calling thread)
  thread_local std::vector<int32_t> stage;
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += q.m * layers[i].n;
  if (static_cast<int64_t>(stage.size()) < total) stage.resize(static_cast<size_t>(total));
  Layer staged[kMaxLayers];
  int64_t at = 0;
  for (int i = 0; i < count; ++i) {
    staged[i] = layers[i];
    staged[i].stage = stage.data() + at;
    at += q.m * layers[i].n;
  }
  int isa = current_isa();
  if (isa > kAvx2 && q.k > kMaxInPlaceK) isa = kAvx2;  // fields in place would overflow int32
  switch (isa) {
#if BITTERN_X86
    case kAvx512Vnni:
      return avx512vnni::linear_impl(q, staged, count, out);
    case kAvxVnni:
      return avxvnni::linear_impl(q, staged, count, out);
    case kAvx2:
      return avx2::linear_impl(q, staged, count, out);
#endif
    default:
      return scalar::linear_impl(q, staged, count, out);
  }
}

}  // namespace bittern_cpu
