// Torch-facing launcher of the CUDA compact_ kernels (compact_kernels.cu is torch-free).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../compact.h"
#include "compact_kernels.cuh"

namespace inf_mllm {
namespace {

int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) return 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace

at::Tensor compact_cuda(at::Tensor& k, at::Tensor& v, at::Tensor& scores, at::Tensor& length,
                        at::TensorList extras, int64_t budget, int64_t n_sink, int64_t n_recent,
                        bool reset_scores, bool return_indices) {
  check_compact_args(k, v, scores, length, extras, budget, n_sink, n_recent);
  TORCH_CHECK(k.is_cuda(), "inf_mllm::compact_ (CUDA kernel): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), H = k.size(1), C = k.size(2), D = k.size(3);
  TORCH_CHECK(B * H < (int64_t(1) << 31), "inf_mllm::compact_: B * Hkv too large");

  // The kept-slot list [B, Hkv, budget] is always built (it drives the move); returned if asked.
  at::Tensor idx = at::empty({B, H, budget}, k.options().dtype(at::kLong));
  if (B * H == 0) return return_indices ? idx : at::empty({0}, k.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(k.device().index()).stream();

  C10_CUDA_CHECK(cuda::launch_compact_select(scores.data_ptr<float>(), length.data_ptr<int32_t>(), idx.data_ptr<int64_t>(),
                                             static_cast<int>(B), static_cast<int>(H), static_cast<int>(C),
                                             static_cast<int>(budget), static_cast<int>(n_sink),
                                             static_cast<int>(n_recent), reset_scores, stream));

  std::vector<char*> bases;
  std::vector<int64_t> row_bytes;
  bases.push_back(static_cast<char*>(k.data_ptr()));
  row_bytes.push_back(D * static_cast<int64_t>(k.element_size()));
  bases.push_back(static_cast<char*>(v.data_ptr()));
  row_bytes.push_back(D * static_cast<int64_t>(v.element_size()));
  for (const auto& e : extras) {
    bases.push_back(static_cast<char*>(e.data_ptr()));
    row_bytes.push_back(static_cast<int64_t>(e.element_size()));
  }
  const int num_sms = sm_count(k.device().index());
  C10_CUDA_CHECK(cuda::launch_compact_move(idx.data_ptr<int64_t>(), bases.data(), row_bytes.data(),
                                           static_cast<int>(bases.size()), length.data_ptr<int32_t>(),
                                           static_cast<int>(B), static_cast<int>(H), static_cast<int>(C),
                                           static_cast<int>(budget), num_sms, stream));
  return return_indices ? idx : at::empty({0}, k.options().dtype(at::kLong));
}

TORCH_LIBRARY_IMPL(inf_mllm, CUDA, m) { m.impl("compact_", &compact_cuda); }

}  // namespace inf_mllm
