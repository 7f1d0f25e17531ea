// Shared, dependency-free helpers of the compact_ operator (SPEC §4.2), usable from C++ and CUDA.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define INF_MLLM_HD __host__ __device__ __forceinline__
#else
#define INF_MLLM_HD inline
#endif

namespace inf_mllm {

// Monotone map of a float32 score onto uint32 such that a larger score gives a larger key,
// matching torch.sort: every NaN ranks above +inf and all NaNs are equal, -0.0 == +0.0.
// Selection is then "key descending, slot ascending" (ties go to the lower slot).
INF_MLLM_HD uint32_t score_key(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, sizeof(u));
#endif
  // Bit tests only (no float compares), so flush-to-zero or fast-math flags cannot change it.
  const uint32_t mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return 0xFFFFFFFFu;  // NaN
  if (mag == 0u) u = 0u;                       // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace inf_mllm
