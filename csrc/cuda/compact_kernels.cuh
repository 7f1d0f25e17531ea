// CUDA kernels of compact_ (SPEC §4.2): plain pointers and ints, no torch headers, so that
// `nvcc -c compact_kernels.cu` compiles on its own (tools/check_cuda.sh).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace inf_mllm {
namespace cuda {

// Per-(row, head) selection. One block per (b, h): reads length[b] on the device (rows with
// length <= budget only write arange(budget) to idx), selects the kept slots into
// idx[b, h, :budget] (int64, increasing), and resets or moves the row's scores.
// Does not touch k/v/extras/length.
cudaError_t launch_compact_select(float* scores, const int32_t* length, int64_t* idx, int B, int H, int C,
                                  int budget, int n_sink, int n_recent, bool reset_scores, cudaStream_t stream);

// Moves every plane's slot idx[b, h, i] to slot i (i < budget), in place, for all (b, h) whose
// kept list is not the identity, then sets length[b] = min(length[b], budget).
// plane p is [B, H, C, row_bytes[p]] bytes at bases[p]. Must run after launch_compact_select
// on the same stream. num_sms sizes the grid (0: assume 132).
cudaError_t launch_compact_move(const int64_t* idx, char* const* bases, const int64_t* row_bytes, int n_planes,
                                int32_t* length, int B, int H, int C, int budget, int num_sms,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace inf_mllm
