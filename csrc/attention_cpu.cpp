// attention_decode (CPU): SPEC §4.1 for a few new queries per row (a decode step), fused in
// one kernel per (row b, KV head h): RoPE of the queries and of each key on load, logits,
// softmax, p v and the window's score update (mean over the GQA group, bias, decay), all in
// float32 with bf16/fp16 converted on load. The PyTorch path of inf_mllm/_torch_path.py calls
// it for n <= a few queries; prefill chunks keep the SDPA path there.
//
//   attention_decode(Tensor q, Tensor k, Tensor v, Tensor length, Tensor(a!)? scores,
//                    float scale, int window, float bias, Tensor? cos, Tensor? sin,
//                    str bias_mode, float decay) -> Tensor
//   cpu_isa() -> str    (the instruction set the kernel runs with on this machine)
//
// q [B, Hq, n, D], k/v [B, Hkv, C, D] (contiguous, float32/bfloat16/float16, one dtype),
// length [B] int32 with n <= length[b] <= C, scores [B, Hkv, C] float32 contiguous (updated in
// place when given and window > 0), cos/sin [>= C, D] float32 contiguous. Returns out
// [B, Hq, n, D] in q's dtype. Slots >= length[b] are never read (k, v) or written (scores).
//
// The arithmetic lives in attention_cpu_kernel.h, compiled once per instruction set
// (attention_cpu_isa.cpp); this file checks arguments, sizes the per-thread scratch,
// parallelises over (b, h) and picks the widest ISA the CPU has (INF_MLLM_CPU_ISA=base|avx2|
// avx512 caps it, for tests and measurements).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attention_cpu.h"

namespace inf_mllm {
namespace {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_built(Isa isa) {
  switch (isa) {
    case Isa::kBase:
      return true;
    case Isa::kAvx2:
#ifdef INF_MLLM_DECODE_HAS_AVX2
      return true;
#else
      return false;
#endif
    case Isa::kAvx512:
#ifdef INF_MLLM_DECODE_HAS_AVX512
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool isa_supported(Isa isa) {
  if (isa == Isa::kBase) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The widest ISA built and supported, capped by INF_MLLM_CPU_ISA; read once.
Isa chosen_isa() {
  static const Isa isa = [] {
    int cap = static_cast<int>(Isa::kAvx512);
    if (const char* env = std::getenv("INF_MLLM_CPU_ISA")) {
      const std::string e(env);
      if (e == "base") cap = 0;
      else if (e == "avx2") cap = 1;
      else if (e == "avx512") cap = 2;
      else TORCH_WARN("inf_mllm: INF_MLLM_CPU_ISA=", e, " is not one of base, avx2, avx512; ignored");
    }
    for (int i = cap; i > 0; --i)
      if (isa_built(static_cast<Isa>(i)) && isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
    return Isa::kBase;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    default:
      return "base";
  }
}

decode::Kernel kernel_for(decode::DType dt) {
  switch (chosen_isa()) {
#ifdef INF_MLLM_DECODE_HAS_AVX512
    case Isa::kAvx512:
      return decode::avx512::kernel_for(dt);
#endif
#ifdef INF_MLLM_DECODE_HAS_AVX2
    case Isa::kAvx2:
      return decode::avx2::kernel_for(dt);
#endif
    default:
      return decode::base::kernel_for(dt);
  }
}

template <typename T>
void store_rows(const float* src, T* dst, int64_t count) {
  for (int64_t e = 0; e < count; ++e) dst[e] = static_cast<T>(src[e]);
}

at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& length, const std::optional<at::Tensor>& scores, double scale,
                                int64_t window, double bias, const std::optional<at::Tensor>& cos,
                                const std::optional<at::Tensor>& sin, c10::string_view bias_mode, double decay) {
  const char* name = "inf_mllm::attention_decode: ";
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && length.device().is_cpu(), name,
              "CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(), name,
              "q must be [B, Hq, n, D] and k, v [B, Hkv, C, D] of one shape, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), C = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0 && n >= 1, name,
              "shapes do not match: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), name,
              "q, k, v must have one dtype");
  decode::DType dt;
  switch (q.scalar_type()) {
    case at::kFloat:
      dt = decode::DType::kFloat;
      break;
    case at::kBFloat16:
      dt = decode::DType::kBFloat16;
      break;
    case at::kHalf:
      dt = decode::DType::kHalf;
      break;
    default:
      TORCH_CHECK(false, name, "dtype ", q.scalar_type(), " is not supported (float32, bfloat16, float16)");
  }
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), name, "q, k, v must be contiguous");
  TORCH_CHECK(length.dim() == 1 && length.size(0) == B && length.scalar_type() == at::kInt, name,
              "length must be int32 [B]");
  const bool scoring = scores.has_value() && window > 0;
  if (scores.has_value()) {
    const at::Tensor& s = *scores;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 3 &&
                    s.size(0) == B && s.size(1) == Hkv && s.size(2) == C,
                name, "scores must be a contiguous float32 [B, Hkv, C] CPU tensor, got ", s.sizes());
  }
  TORCH_CHECK(window >= 0, name, "window must be >= 0");
  TORCH_CHECK(cos.has_value() == sin.has_value(), name, "cos and sin must be given together");
  if (cos.has_value()) {
    for (const at::Tensor* t : {&*cos, &*sin})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) >= C && t->size(1) == D,
                  name, "cos and sin must be contiguous float32 [>= C, D] CPU tensors, got ", t->sizes());
    TORCH_CHECK(D % 2 == 0, name, "RoPE needs an even head dim, got ", D);
  }
  decode::BiasMode mode;
  if (bias_mode == "absolute")
    mode = decode::BiasMode::kAbsolute;
  else if (bias_mode == "relative")
    mode = decode::BiasMode::kRelative;
  else
    TORCH_CHECK(false, name, "bias_mode must be 'absolute' or 'relative', got '", std::string(bias_mode), "'");

  std::vector<int64_t> L(B);
  const at::Tensor length_c = length.contiguous();  // held: a strided length's copy must outlive lp
  const int32_t* lp = length_c.data_ptr<int32_t>();
  int64_t Lmax = 0;
  for (int64_t b = 0; b < B; ++b) {
    L[b] = lp[b];
    TORCH_CHECK(L[b] >= n && L[b] <= C, name, "length[", b, "]=", L[b], " is outside [n=", n, ", C=", C, "]");
    Lmax = std::max(Lmax, L[b]);
  }

  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (q.numel() == 0) return out;
  const int64_t G = Hq / Hkv, R = G * n;
  decode::Args a{q.data_ptr(), k.data_ptr(), v.data_ptr(),
                 cos.has_value() ? cos->data_ptr<float>() : nullptr,
                 sin.has_value() ? sin->data_ptr<float>() : nullptr,
                 scoring ? scores->data_ptr<float>() : nullptr,
                 Hkv, G, n, C, D, static_cast<float>(scale),
                 scoring ? std::min(window, n) : 0, bias, mode, static_cast<float>(decay)};
  const decode::Kernel kern = kernel_for(dt);
  TORCH_CHECK(kern.run != nullptr, name, "no kernel for this dtype");
  const bool f32 = dt == decode::DType::kFloat;
  void* out_ptr = out.data_ptr();
  const int64_t scratch = kern.scratch_floats(R, D, Lmax) + (f32 ? 0 : R * D);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    // per thread, uninitialised (the kernel writes every element before reading it); float32
    // output rows go straight into out, the others through a float32 staging block
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(scratch)]);
    float* stage = buf.get() + kern.scratch_floats(R, D, Lmax);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const int64_t row0 = (b * Hq + h * G) * n * D;  // first element of this (b, h)'s R output rows
      kern.run(a, b, h, L[b], buf.get(), f32 ? static_cast<float*>(out_ptr) + row0 : stage);
      if (dt == decode::DType::kBFloat16)
        store_rows(stage, static_cast<at::BFloat16*>(out_ptr) + row0, R * D);
      else if (dt == decode::DType::kHalf)
        store_rows(stage, static_cast<at::Half*>(out_ptr) + row0, R * D);
    }
  });
  return out;
}

std::string cpu_isa() { return isa_name(chosen_isa()); }

}  // namespace

TORCH_LIBRARY_IMPL(inf_mllm, CPU, m) { m.impl("attention_decode", &attention_decode_cpu); }
TORCH_LIBRARY_IMPL(inf_mllm, CompositeExplicitAutograd, m) { m.impl("cpu_isa", &cpu_isa); }

}  // namespace inf_mllm
