// bittern's native CPU kernels for the ternary linear layer (docs/design.md §2): the interface between the kernels
// (ternary_cpu.cpp, plain pointers, no tensor types) and the PyTorch operators (ternary_cpu_ops.cpp).
//
// The arithmetic is bittern.quant's, bit for bit, in float32 without FMA contraction:
//   per token   amax = max(max_k |x_k|, 1e-5f);  s_x = (1.0f / amax) * 127.0f;
//               xq_k = clamp(round_half_even(x_k * s_x), -128, 127)
//   per output  acc_n = sum_k xq_k * code_nk   (exact, int32)
//               y_n = (float)acc_n / (s_w_n * s_x) [+ bias_n], then rounded to the output dtype.
// Codes come in the Hugging Face 2-bit layout (bittern/packing.py): uint8 [R = ceil(N/4), K], byte row r holding
// output rows r, r+R, r+2R, r+3R in bits 0-1, 2-3, 4-5, 6-7 as code + 1. The kernels multiply the unsigned code + 1
// (0, 1, 2; the invalid 3 as 3, i.e. code 2, like the reference's unpacking) by the int8 activations and subtract
// the token's activation sum once per output: sum_k (c + 1) x_k - sum_k x_k = sum_k c x_k.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace bittern_cpu {

// Instruction sets, in increasing order; each kernel exists for every one.
enum Isa : int {
  kScalar = 0,      // portable C++
  kAvx2 = 1,        // x86-64 AVX2: vpmaddubsw into int16, vpmaddwd into int32
  kAvxVnni = 2,     // x86-64 AVX-VNNI: 256-bit vpdpbusd into int32
  kAvx512Vnni = 3,  // x86-64 AVX-512 (F, BW) + AVX512-VNNI: 512-bit vpdpbusd into int32
};
constexpr int kIsaCount = 4;

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Bytes of padding of a quantized activation row: K is rounded up to a multiple of this.
constexpr int64_t kRowAlign = 64;

// The widest input the kernels take: sum_k 3 * 128 must fit in int32 (wider goes to the reference).
constexpr int64_t kMaxK = 5592405;

inline int64_t padded_k(int64_t k) { return (k + kRowAlign - 1) / kRowAlign * kRowAlign; }

// Activations quantized per token: int8 rows padded with zeros to `kp` bytes, the scale s_x of every token and the
// exact sum of its int8 codes.
struct Quantized {
  int8_t* xq;       // [m, kp]
  float* scale;     // [m]
  int32_t* rowsum;  // [m]
  int64_t m;
  int64_t k;
  int64_t kp;
};

// One packed layer of a product; every layer of a group reads the same activations.
struct Layer {
  const uint8_t* packed;  // [rows, k], rows = ceil(n / 4)
  int64_t n;              // output features
  int64_t rows;           // byte rows
  const float* scale;     // s_w: [1] or [n]
  bool per_row;           // scale has n entries
  const float* bias;      // [n] float32, or nullptr
  void* out;              // [m, n] in the output dtype, rows of n elements
  int32_t* stage;         // [m, n] int32 scratch of the kernels (set by linear())
};

// f(begin, end) over [0, n) in chunks of `chunk` items that the threads of torch's intra-op pool (at::parallel_for,
// so torch.set_num_threads applies) take as they free up: a thread slowed by another process takes fewer, where an
// even split would wait for it. On the calling thread alone when there is one chunk or one thread.
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// Which instruction sets this CPU runs (bit i: Isa i); scalar is always there.
int supported_isas();
// The instruction set the kernels use; `set_isa` picks one (clamped to the best supported), -1 the best.
int current_isa();
int set_isa(int isa);

// How many threads of torch's intra-op pool at::parallel_for runs `n` one-item tasks on.
int parallel_threads(int64_t n);

// Quantize `m` rows of `k` activations (float32 or bfloat16, `stride` elements apart) into `q` (sized by the
// caller: m rows of padded_k(k) bytes). Parallel over rows.
void quantize(const void* x, DType dtype, int64_t stride, const Quantized& q);
// Quantized rows given as int8 [m, k] with their scales [m]: copy into `q`'s padded rows and sum them.
void prepare(const int8_t* xq, const float* scale, const Quantized& q);
// out_i = (q.xq @ codes_i^T) / (s_w_i * s_x) [+ bias_i] for every layer of `layers`, in `out` dtype.
// Parallel over the byte rows of all layers together.
void linear(const Quantized& q, const Layer* layers, int count, DType out);

// ---- the engine's other kernels (engine_cpu.cpp) ----------------------------------------------------------------

// y [m, n] = x [m, k] @ w [n, k]^T (+ bias [n]), float32 sums; w float32, bfloat16 or float16. Parallel over rows.
void dense_linear(const void* x, DType xdt, const void* w, DType wdt, const void* bias, DType bdt, void* y, DType ydt,
                  int64_t m, int64_t n, int64_t k);

// s = x + residual (when residual is given; rounded to x's dtype, stored in s_out), then
// y = weight * (s * rsqrt(mean(s^2) + eps)).to(x's dtype), in y's dtype: a Hugging Face LlamaRMSNorm. Rows [m, d].
void rms_norm(const void* x, const void* residual, void* s_out, DType xdt, const void* weight, DType wdt, void* y,
              DType ydt, int64_t m, int64_t d, float eps);

// rms_norm's y quantized into q (q.m rows of q.k values) without storing y, for the packed layers reading it; with
// `gate` (and no residual), the norm's input is square(relu(gate)) * x (relu2_mul), BitNet's FFN. y's dtype `ydt`
// only decides its rounding.
void rms_norm_quantize(const void* x, const void* residual, const void* gate, void* s_out, DType xdt,
                       const void* weight, DType wdt, DType ydt, float eps, const Quantized& q);

// out = square(relu(gate)) * up, every step rounded to `dt` as PyTorch rounds it: Hugging Face's
// ReLUSquaredActivation (BitNet's relu²) times the up projection. n elements.
void relu2_mul(const void* gate, const void* up, void* out, DType dt, int64_t n);

// The decode step's attention for one new token per row (all tensors in `dtype`, contiguous): rope on q and k at
// position max(slot - pad[b], 0), k and v written into the cache at `slot`, then each query head attends over the
// row's slots [pad[b], slot] (within `window` when > 0).
struct AttentionArgs {
  const void* q;     // [batch, kv_heads, groups, head_dim]
  const void* k;     // [batch, kv_heads, head_dim]
  const void* v;     // [batch, kv_heads, head_dim]
  const void* cos;   // [positions, head_dim]
  const void* sin;   // [positions, head_dim]
  void* keys;        // [>= batch, kv_heads, cache_len, head_dim]
  void* values;      // [>= batch, kv_heads, cache_len, head_dim]
  void* out;         // [batch, kv_heads, groups, head_dim]
  const int64_t* pad;  // [batch]
  DType dtype;
  int64_t batch, kv_heads, groups, head_dim, cache_len, slot, window;
  float scale;
};
void decode_attention(const AttentionArgs& args);

}  // namespace bittern_cpu
