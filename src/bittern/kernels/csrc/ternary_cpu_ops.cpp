// PyTorch operators (torch.ops.bittern_cpu.*) over the kernels of ternary_cpu.cpp: argument checks (one clear
// error each), output allocation, dtype handling. Called by bittern/kernels/cpu.py, which documents them.

#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <optional>
#include <vector>

#include "ternary_cpu.h"

namespace bittern_cpu {
namespace {

DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      return DType::kFloat32;
  }
}

bool kernel_output(at::ScalarType type) {
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

// The quantized activations of a call, in a buffer of the calling thread reused by its later calls (a tensor
// allocation costs about as much as a decode step's whole quantization).
struct Workspace {
  std::vector<int8_t> xq;
  std::vector<float> scale;
  std::vector<int32_t> rowsum;

  Quantized get(int64_t m, int64_t k) {
    const int64_t kp = padded_k(k);
    if (static_cast<int64_t>(xq.size()) < m * kp) xq.resize(static_cast<size_t>(m * kp));
    if (static_cast<int64_t>(scale.size()) < m) {
      scale.resize(static_cast<size_t>(m));
      rowsum.resize(static_cast<size_t>(m));
    }
    return Quantized{xq.data(), scale.data(), rowsum.data(), m, k, kp};
  }
};

Quantized workspace(int64_t m, int64_t k) {
  thread_local Workspace w;
  return w.get(m, k);
}

// x [..., K] as rows for the kernel: float32 or bfloat16, contiguous (anything else upcast or copied first, as the
// reference upcasts).
at::Tensor kernel_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "bittern_cpu.", what, ": x must be on the CPU, not ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bittern_cpu.", what, ": x must be floating, not ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) <= kMaxK, "bittern_cpu.", what,
              ": x must have a last dimension of 1 to ", kMaxK, " features, got ", x.sizes());
  const bool direct = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (direct && x.is_contiguous()) return x;
  return (direct ? x : x.to(at::kFloat)).contiguous();
}

Quantized quantize_rows(const at::Tensor& x, const Quantized& q) {
  quantize(x.data_ptr(), kernel_dtype(x.scalar_type()), q.k, q);
  return q;
}

std::vector<at::Tensor> run(const Quantized& q, at::IntArrayRef lead, at::TensorList packed,
                            at::IntArrayRef out_features, at::TensorList scales, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype, const char* what) {
  const int64_t count = static_cast<int64_t>(packed.size());
  TORCH_CHECK(count >= 1, "bittern_cpu.", what, ": no layers given");
  TORCH_CHECK(static_cast<int64_t>(out_features.size()) == count && static_cast<int64_t>(scales.size()) == count,
              "bittern_cpu.", what, ": ", count, " packed weights but ", out_features.size(), " output sizes and ",
              scales.size(), " scales");
  TORCH_CHECK(!bias.has_value() || count == 1, "bittern_cpu.", what, ": a bias needs a single layer");
  const at::ScalarType compute = kernel_output(out_dtype) ? out_dtype : at::kFloat;
  std::vector<at::Tensor> outs, keep;
  std::vector<Layer> layers;
  outs.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& w = packed[i];
    const int64_t n = out_features[i];
    TORCH_CHECK(n > 0, "bittern_cpu.", what, ": out_features must be positive, got ", n);
    const int64_t rows = (n + 3) / 4;
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.size(0) == rows &&
                    w.size(1) == q.k && w.is_contiguous(),
                "bittern_cpu.", what, ": packed weight ", i, " must be a contiguous CPU uint8 [", rows, ", ", q.k,
                "] tensor for ", n, " outputs and ", q.k, " inputs, got ", w.scalar_type(), " ", w.sizes());
    const at::Tensor& s = scales[i];
    TORCH_CHECK(s.device().is_cpu() && (s.numel() == 1 || s.numel() == n), "bittern_cpu.", what, ": scale ", i,
                " must be a CPU tensor of 1 or ", n, " values, got ", s.sizes(), " on ", s.device());
    at::Tensor scale = s.scalar_type() == at::kFloat && s.is_contiguous() ? s : s.to(at::kFloat).contiguous();
    keep.push_back(scale);
    const float* bias_ptr = nullptr;
    if (bias.has_value()) {
      TORCH_CHECK(bias->device().is_cpu() && bias->numel() == n, "bittern_cpu.", what, ": bias must be a CPU [", n,
                  "] tensor, got ", bias->sizes(), " on ", bias->device());
      at::Tensor b32 = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias
                                                                                  : bias->to(at::kFloat).contiguous();
      keep.push_back(b32);
      bias_ptr = b32.data_ptr<float>();
    }
    std::vector<int64_t> shape(lead.begin(), lead.end());
    shape.push_back(n);
    at::Tensor out = at::empty(shape, at::TensorOptions().dtype(compute).device(at::kCPU));
    layers.push_back(Layer{w.data_ptr<uint8_t>(), n, rows, scale.data_ptr<float>(), s.numel() != 1, bias_ptr,
                           out.data_ptr()});
    outs.push_back(out);
  }
  linear(q, layers.data(), static_cast<int>(count), kernel_dtype(compute));
  if (compute != out_dtype)
    for (auto& out : outs) out = out.to(out_dtype);
  return outs;
}

std::vector<at::Tensor> packed_linear(const at::Tensor& x, at::TensorList packed, at::IntArrayRef out_features,
                                      at::TensorList scales, const std::optional<at::Tensor>& bias,
                                      at::ScalarType out_dtype) {
  const at::Tensor rows = kernel_input(x, "packed_linear");
  const int64_t k = rows.size(-1);
  const Quantized q = quantize_rows(rows, workspace(rows.numel() / k, k));
  const auto sizes = x.sizes();
  return run(q, sizes.slice(0, sizes.size() - 1), packed, out_features, scales, bias, out_dtype, "packed_linear");
}

std::vector<at::Tensor> packed_quantized(const at::Tensor& xq, const at::Tensor& act_scale, at::TensorList packed,
                                         at::IntArrayRef out_features, at::TensorList scales,
                                         const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(xq.device().is_cpu() && xq.scalar_type() == at::kChar && xq.dim() >= 1 && xq.size(-1) > 0 &&
                  xq.size(-1) <= kMaxK,
              "bittern_cpu.packed_quantized: xq must be a CPU int8 [..., K] tensor with 1 <= K <= ", kMaxK, ", got ",
              xq.scalar_type(), " ", xq.sizes());
  const at::Tensor rows = xq.contiguous();
  const int64_t k = rows.size(-1);
  const int64_t m = rows.numel() / k;
  TORCH_CHECK(act_scale.numel() == m, "bittern_cpu.packed_quantized: act_scale must hold one scale per token (", m,
              "), got ", act_scale.sizes());
  const at::Tensor scale = act_scale.to(at::kFloat).contiguous();
  Quantized q = workspace(m, k);
  prepare(rows.data_ptr<int8_t>(), scale.data_ptr<float>(), q);
  const auto sizes = xq.sizes();
  return run(q, sizes.slice(0, sizes.size() - 1), packed, out_features, scales, bias, out_dtype,
             "packed_quantized");
}

std::tuple<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x) {
  const at::Tensor rows = kernel_input(x, "quantize");
  const int64_t k = rows.size(-1);
  const int64_t m = rows.numel() / k;
  const Quantized q = quantize_rows(rows, workspace(m, k));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  at::Tensor xq = at::empty(shape, at::TensorOptions().dtype(at::kChar));
  for (int64_t t = 0; t < m; ++t)
    std::memcpy(xq.data_ptr<int8_t>() + t * k, q.xq + t * q.kp, static_cast<size_t>(k));
  shape.back() = 1;
  at::Tensor scale = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  std::memcpy(scale.data_ptr<float>(), q.scale, static_cast<size_t>(m) * sizeof(float));
  return {xq, scale};
}

// ---- the engine's other kernels ----------------------------------------------------------------------------------

bool kernel_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

at::Tensor dense_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && kernel_float(x.scalar_type()) && x.dim() >= 1, "bittern_cpu.dense_linear: x ",
              "must be a float32, bfloat16 or float16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const int64_t k = x.size(-1);
  TORCH_CHECK(weight.device().is_cpu() && kernel_float(weight.scalar_type()) && weight.dim() == 2 &&
                  weight.size(1) == k,
              "bittern_cpu.dense_linear: weight must be a float32, bfloat16 or float16 CPU [N, ", k, "] tensor, got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t n = weight.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->device().is_cpu() && kernel_float(bias->scalar_type()) &&
                                    bias->numel() == n),
              "bittern_cpu.dense_linear: bias must be a CPU [", n, "] tensor");
  const at::Tensor rows = x.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, at::TensorOptions().dtype(x.scalar_type()));
  dense_linear(rows.data_ptr(), kernel_dtype(x.scalar_type()), w.data_ptr(), kernel_dtype(w.scalar_type()),
               b.defined() ? b.data_ptr() : nullptr, b.defined() ? kernel_dtype(b.scalar_type()) : DType::kFloat32,
               y.data_ptr(), kernel_dtype(x.scalar_type()), rows.numel() / std::max<int64_t>(k, 1), n, k);
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && kernel_float(x.scalar_type()) && x.dim() >= 1, "bittern_cpu.rms_norm: x must ",
              "be a float32, bfloat16 or float16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.device().is_cpu() && kernel_float(weight.scalar_type()) && weight.numel() == d,
              "bittern_cpu.rms_norm: weight must be a CPU [", d, "] tensor, got ", weight.sizes());
  TORCH_CHECK(!residual.has_value() || (residual->sizes() == x.sizes() &&
                                        residual->scalar_type() == x.scalar_type() && residual->device().is_cpu()),
              "bittern_cpu.rms_norm: residual must match x");
  const at::Tensor rows = x.contiguous(), w = weight.contiguous();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor s = r.defined() ? at::empty(x.sizes(), x.options()) : x;
  const at::ScalarType ytype = c10::promoteTypes(weight.scalar_type(), x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(ytype));
  rms_norm(rows.data_ptr(), r.defined() ? r.data_ptr() : nullptr, r.defined() ? s.data_ptr() : nullptr,
           kernel_dtype(x.scalar_type()), w.data_ptr(), kernel_dtype(w.scalar_type()), y.data_ptr(),
           kernel_dtype(ytype), rows.numel() / std::max<int64_t>(d, 1), d, static_cast<float>(eps));
  return {s, y};
}

// [s, out_1, ...]: s = x + residual (x itself without one), then the packed layers of rms_norm(s) (or of
// rms_norm(square(relu(gate)) * x)), quantized straight from the norm.
std::vector<at::Tensor> norm_linear_op(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                       const std::optional<at::Tensor>& gate, const at::Tensor& weight, double eps,
                                       at::TensorList packed, at::IntArrayRef out_features, at::TensorList scales,
                                       const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(x.device().is_cpu() && kernel_float(x.scalar_type()) && x.dim() >= 1 && x.size(-1) > 0 &&
                  x.size(-1) <= kMaxK,
              "bittern_cpu.norm_linear: x must be a float32, bfloat16 or float16 CPU [..., D] tensor, got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.device().is_cpu() && kernel_float(weight.scalar_type()) && weight.numel() == d,
              "bittern_cpu.norm_linear: weight must be a CPU [", d, "] tensor, got ", weight.sizes());
  for (const auto* other : {&residual, &gate})
    TORCH_CHECK(!other->has_value() || ((*other)->sizes() == x.sizes() &&
                                        (*other)->scalar_type() == x.scalar_type() && (*other)->device().is_cpu()),
                "bittern_cpu.norm_linear: residual and gate must match x");
  TORCH_CHECK(!(residual.has_value() && gate.has_value()), "bittern_cpu.norm_linear: a residual or a gate, not both");
  const at::Tensor rows = x.contiguous(), w = weight.contiguous();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor g = gate.has_value() ? gate->contiguous() : at::Tensor();
  at::Tensor s = r.defined() ? at::empty(x.sizes(), x.options()) : x;
  const int64_t m = rows.numel() / d;
  const Quantized q = workspace(m, d);
  rms_norm_quantize(rows.data_ptr(), r.defined() ? r.data_ptr() : nullptr, g.defined() ? g.data_ptr() : nullptr,
                    r.defined() ? s.data_ptr() : nullptr, kernel_dtype(x.scalar_type()), w.data_ptr(),
                    kernel_dtype(w.scalar_type()), kernel_dtype(c10::promoteTypes(weight.scalar_type(), x.scalar_type())),
                    static_cast<float>(eps), q);
  const auto sizes = x.sizes();
  std::vector<at::Tensor> outs =
      run(q, sizes.slice(0, sizes.size() - 1), packed, out_features, scales, bias, out_dtype, "norm_linear");
  outs.insert(outs.begin(), s);
  return outs;
}

at::Tensor relu2_mul_op(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && kernel_float(gate.scalar_type()) && gate.sizes() == up.sizes() &&
                  gate.scalar_type() == up.scalar_type() && up.device().is_cpu(),
              "bittern_cpu.relu2_mul: gate and up must be CPU tensors of one shape and one float32, bfloat16 or ",
              "float16 dtype, got ", gate.scalar_type(), " ", gate.sizes(), " and ", up.scalar_type(), " ", up.sizes());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  relu2_mul(g.data_ptr(), u.data_ptr(), out.data_ptr(), kernel_dtype(gate.scalar_type()), gate.numel());
  return out;
}

at::Tensor decode_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                               const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, const at::Tensor& slot,
                               const at::Tensor& pad, double scale, std::optional<int64_t> window) {
  const auto type = q.scalar_type();
  TORCH_CHECK(q.device().is_cpu() && kernel_float(type) && q.dim() == 4, "bittern_cpu.decode_attention: q must be ",
              "a float32, bfloat16 or float16 CPU [B, H_kv, G, D] tensor, got ", type, " ", q.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), groups = q.size(2), dim = q.size(3);
  TORCH_CHECK(dim % 2 == 0, "bittern_cpu.decode_attention: the head dimension must be even, got ", dim);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == type && t->sizes() == at::IntArrayRef({batch, heads, dim}),
                "bittern_cpu.decode_attention: k and v must be [", batch, ", ", heads, ", ", dim, "] in ", type);
  for (const at::Tensor* t : {&keys, &values})
    TORCH_CHECK(t->scalar_type() == type && t->dim() == 4 && t->size(0) >= batch && t->size(1) == heads &&
                    t->size(3) == dim && t->is_contiguous(),
                "bittern_cpu.decode_attention: the cache must be contiguous [>= ", batch, ", ", heads, ", S, ", dim,
                "] in ", type, ", got ", t->sizes());
  TORCH_CHECK(keys.sizes() == values.sizes(), "bittern_cpu.decode_attention: keys and values differ in shape");
  TORCH_CHECK(slot.device().is_cpu() && slot.scalar_type() == at::kLong && slot.numel() == 1,
              "bittern_cpu.decode_attention: slot must be a CPU int64 tensor of one value");
  const int64_t where = *slot.contiguous().data_ptr<int64_t>();
  TORCH_CHECK(where >= 0 && where < keys.size(2), "bittern_cpu.decode_attention: slot ", where, " outside the cache");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == type && t->dim() == 2 && t->size(1) == dim && t->size(0) > where,
                "bittern_cpu.decode_attention: the rope tables must be [> ", where, ", ", dim, "] in ", type);
  TORCH_CHECK(pad.device().is_cpu() && pad.scalar_type() == at::kLong && pad.numel() == batch, "bittern_cpu.decode_attention: pad must be ",
              "int64 [", batch, "]");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), cc = cos.contiguous(),
                   sc = sin.contiguous(), pc = pad.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  AttentionArgs args{qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), cc.data_ptr(), sc.data_ptr(), keys.data_ptr(),
                     values.data_ptr(), out.data_ptr(), pc.data_ptr<int64_t>(), kernel_dtype(type), batch, heads,
                     groups, dim, keys.size(2), where, window.value_or(0), static_cast<float>(scale)};
  decode_attention(args);
  return out;
}

int64_t isa(int64_t request) {
  if (request >= -1) set_isa(static_cast<int>(request));
  return current_isa();
}

int64_t isas() { return supported_isas(); }

int64_t threads(int64_t n) { return parallel_threads(n); }

}  // namespace
}  // namespace bittern_cpu

TORCH_LIBRARY(bittern_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor[] packed, int[] out_features, Tensor[] scales, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor[]",
        &bittern_cpu::packed_linear);
  m.def("packed_quantized(Tensor xq, Tensor act_scale, Tensor[] packed, int[] out_features, Tensor[] scales, "
        "Tensor? bias, ScalarType out_dtype) -> Tensor[]",
        &bittern_cpu::packed_quantized);
  m.def("quantize(Tensor x) -> (Tensor, Tensor)", &bittern_cpu::quantize_activations);
  m.def("isa(int request) -> int", &bittern_cpu::isa);
  m.def("isas() -> int", &bittern_cpu::isas);
  m.def("parallel_threads(int n) -> int", &bittern_cpu::threads);
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &bittern_cpu::dense_linear_op);
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        &bittern_cpu::rms_norm_op);
  m.def("relu2_mul(Tensor gate, Tensor up) -> Tensor", &bittern_cpu::relu2_mul_op);
  m.def("norm_linear(Tensor x, Tensor? residual, Tensor? gate, Tensor weight, float eps, Tensor[] packed, "
        "int[] out_features, Tensor[] scales, Tensor? bias, ScalarType out_dtype) -> Tensor[]",
        &bittern_cpu::norm_linear_op);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
        "Tensor slot, Tensor pad, float scale, int? window) -> Tensor",
        &bittern_cpu::decode_attention_op);
}
