// compact_ (SPEC §4.2): declarations and argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <vector>

namespace inf_mllm {

// The operator's schema is defined once, in inf_mllm/ops.py (COMPACT_SCHEMA); the kernels
// below are registered for it with TORCH_LIBRARY_IMPL beside their implementations.
at::Tensor compact_cpu(at::Tensor& k, at::Tensor& v, at::Tensor& scores, at::Tensor& length,
                       at::TensorList extras, int64_t budget, int64_t n_sink, int64_t n_recent,
                       bool reset_scores, bool return_indices);

#ifdef INF_MLLM_WITH_CUDA
at::Tensor compact_cuda(at::Tensor& k, at::Tensor& v, at::Tensor& scores, at::Tensor& length,
                        at::TensorList extras, int64_t budget, int64_t n_sink, int64_t n_recent,
                        bool reset_scores, bool return_indices);
#endif

// Shape/dtype/device/contiguity checks (cheap, no device sync). The Python wrapper
// inf_mllm.ops.compact_ checks the same things with friendlier messages; these keep the raw
// torch.ops entry point from touching memory out of bounds.
inline void check_compact_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& scores,
                               const at::Tensor& length, at::TensorList extras, int64_t budget,
                               int64_t n_sink, int64_t n_recent) {
  TORCH_CHECK(k.dim() == 4, "inf_mllm::compact_: k must be [B, Hkv, C, D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "inf_mllm::compact_: v shape ", v.sizes(), " != k shape ", k.sizes());
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "inf_mllm::compact_: k and v dtypes differ");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "inf_mllm::compact_: k and v must be contiguous");
  const int64_t B = k.size(0), H = k.size(1), C = k.size(2);
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "inf_mllm::compact_: scores must be float32");
  TORCH_CHECK(scores.dim() == 3 && scores.size(0) == B && scores.size(1) == H && scores.size(2) == C,
              "inf_mllm::compact_: scores must be [B, Hkv, C], got ", scores.sizes());
  TORCH_CHECK(scores.is_contiguous(), "inf_mllm::compact_: scores must be contiguous");
  TORCH_CHECK(length.scalar_type() == at::kInt && length.dim() == 1 && length.size(0) == B,
              "inf_mllm::compact_: length must be int32 [B]");
  TORCH_CHECK(length.is_contiguous(), "inf_mllm::compact_: length must be contiguous");
  const auto dev = k.device();
  TORCH_CHECK(v.device() == dev && scores.device() == dev && length.device() == dev,
              "inf_mllm::compact_: all tensors must be on ", dev);
  for (size_t i = 0; i < extras.size(); ++i) {
    const auto& e = extras[i];
    TORCH_CHECK(e.dim() == 3 && e.size(0) == B && e.size(1) == H && e.size(2) == C,
                "inf_mllm::compact_: extras[", i, "] must be [B, Hkv, C], got ", e.sizes());
    TORCH_CHECK(e.is_contiguous(), "inf_mllm::compact_: extras[", i, "] must be contiguous");
    TORCH_CHECK(e.device() == dev, "inf_mllm::compact_: extras[", i, "] is on ", e.device(), ", expected ", dev);
  }
  TORCH_CHECK(n_sink >= 0 && n_recent >= 0, "inf_mllm::compact_: n_sink and n_recent must be >= 0");
  TORCH_CHECK(budget >= 1 && budget >= n_sink + n_recent && budget <= C,
              "inf_mllm::compact_: need n_sink + n_recent <= budget <= C and budget >= 1; got budget=", budget,
              " n_sink=", n_sink, " n_recent=", n_recent, " C=", C);
  TORCH_CHECK(C < (int64_t(1) << 31), "inf_mllm::compact_: C must fit in int32");
  // Every buffer is moved in place: two that share memory would be moved twice.
  std::vector<std::pair<std::string, at::TensorBase>> bufs = {{"k", k}, {"v", v}, {"scores", scores}, {"length", length}};
  for (size_t i = 0; i < extras.size(); ++i) bufs.emplace_back("extras[" + std::to_string(i) + "]", extras[i]);
  for (size_t i = 0; i < bufs.size(); ++i)
    for (size_t j = i + 1; j < bufs.size(); ++j)
      TORCH_CHECK(at::get_overlap_status(bufs[i].second, bufs[j].second) != at::MemOverlapStatus::Full &&
                      at::get_overlap_status(bufs[i].second, bufs[j].second) != at::MemOverlapStatus::Partial,
                  "inf_mllm::compact_: ", bufs[i].first, " and ", bufs[j].first, " share memory");
}

}  // namespace inf_mllm
