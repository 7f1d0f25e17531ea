// rope (CPU): x * cos + rotate_half(x) * sin in one pass, for the CPU path of
// attention_with_scores (inf_mllm/_torch_path.py), which rotates every cached key at its slot on
// each call in rolling mode (SPEC §3). The obvious PyTorch form takes three broadcasting passes
// over the keys (a multiply and two half-width addcmul); this reads x, cos and sin once and
// writes the result once.
//
//   rope(Tensor x, Tensor cos, Tensor sin) -> Tensor
//   x [..., L, D] (float32/float64/bfloat16/float16; each [L, D] plane contiguous, the leading
//   dims strided as they come, e.g. the valid slots k[:, :, :L] of a [B, Hkv, C, D] buffer),
//   cos/sin [L, D] (float32 or float64, contiguous): a new contiguous tensor
//   out[..., j, d] = x[j, d] * cos[j, d] - x[j, d + D/2] * sin[j, d] for d < D/2 and
//   x[j, d] * cos[j, d] + x[j, d - D/2] * sin[j, d] otherwise (the Llama / transformers
//   convention), in the dtype of cos (x is converted on load).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace inf_mllm {
namespace {

// One row; __restrict__ on parameters (GCC ignores it on locals) spares the vectoriser its
// run-time aliasing checks, which cost ~40% on 64-float rows.
template <typename in_t, typename out_t>
inline void rope_row(const in_t* __restrict__ xr, const out_t* __restrict__ c, const out_t* __restrict__ s,
                     out_t* __restrict__ o, int64_t h) {
  for (int64_t d = 0; d < h; ++d) {
    const out_t a = static_cast<out_t>(xr[d]);
    const out_t b = static_cast<out_t>(xr[d + h]);
    o[d] = a * c[d] - b * s[d];
    o[d + h] = b * c[d + h] + a * s[d + h];
  }
}

template <typename in_t, typename out_t>
void rope_planes(const in_t* x, const std::vector<int64_t>& plane_off, const out_t* cs, const out_t* sn, out_t* out,
                 int64_t L, int64_t D) {
  const int64_t h = D / 2;
  const int64_t P = static_cast<int64_t>(plane_off.size());
  // Plane by plane, slot by slot: every stream (x, cos, sin, out) is walked sequentially, which
  // measured faster than blocking the slots to keep the tables in cache across planes
  // (1.7 vs 2.0-3.0 ms for [8, 4000, 128] float32, one thread; a copy of x takes 1.2 ms).
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const in_t* xp = x + plane_off[p];
      out_t* op = out + p * L * D;  // a fresh tensor: never aliases the inputs
      for (int64_t j = 0; j < L; ++j) rope_row(xp + j * D, cs + j * D, sn + j * D, op + j * D, h);
    }
  });
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "inf_mllm::rope: CPU tensors only");
  TORCH_CHECK(x.dim() >= 2, "inf_mllm::rope: x must be [..., L, D], got ", x.sizes());
  const int64_t L = x.size(-2), D = x.size(-1);
  TORCH_CHECK(D % 2 == 0, "inf_mllm::rope: the head dim must be even, got ", D);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == L && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "inf_mllm::rope: cos and sin must be [L, D] = [", L, ", ", D, "], got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type() &&
                  (cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kDouble),
              "inf_mllm::rope: cos and sin must both be float32 or both float64");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "inf_mllm::rope: cos and sin must be contiguous");
  TORCH_CHECK((x.stride(-1) == 1 || D == 1) && (x.stride(-2) == D || L <= 1),
              "inf_mllm::rope: the last two dims of x must be contiguous, got strides ", x.strides());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(cos.scalar_type()));
  if (x.numel() == 0) return out;
  // Element offset of every [L, D] plane (the leading dims, row-major).
  std::vector<int64_t> plane_off(1, 0);
  for (int64_t dim = 0; dim < x.dim() - 2; ++dim) {
    std::vector<int64_t> next;
    next.reserve(plane_off.size() * x.size(dim));
    for (int64_t base : plane_off)
      for (int64_t i = 0; i < x.size(dim); ++i) next.push_back(base + i * x.stride(dim));
    plane_off.swap(next);
  }
  AT_DISPATCH_FLOATING_TYPES(cos.scalar_type(), "inf_mllm_rope_out", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "inf_mllm_rope_in", [&] {
      rope_planes<scalar_t, out_t>(x.data_ptr<scalar_t>(), plane_off, cos.data_ptr<out_t>(),
                                   sin.data_ptr<out_t>(), out.data_ptr<out_t>(), L, D);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(inf_mllm, CPU, m) { m.impl("rope", &rope_cpu); }

}  // namespace inf_mllm
