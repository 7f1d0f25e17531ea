// Fused CPU decode attention (SPEC §4.1, n small): the interface between the dispatcher
// (csrc/attention_cpu.cpp, torch headers, baseline ISA) and the arithmetic kernel
// (csrc/attention_cpu_kernel.h), which is compiled once per instruction set
// (csrc/attention_cpu_isa.cpp) and therefore includes no torch header: an inline function of
// a shared header compiled with AVX2 in one object could be the copy the linker keeps for all.
#pragma once

#include <cstdint>

namespace inf_mllm {
namespace decode {

enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };
enum class BiasMode : int { kAbsolute = 0, kRelative = 1 };

// One call's arguments. q [B, Hq, n, D], k/v [B, Hkv, C, D] contiguous; length already checked
// (n <= L <= C); cos/sin [>= C, D] float32 rows of D (nullptr: no RoPE); scores [B, Hkv, C]
// float32 (nullptr: no scoring); w = min(window, n) when scoring, else 0.
struct Args {
  const void* q;
  const void* k;
  const void* v;
  const float* cos;
  const float* sin;
  float* scores;
  int64_t Hkv, G, n, C, D;
  float scale;
  int64_t w;
  double bias;
  BiasMode bias_mode;
  float decay;
};

// Computes KV head h of row b holding L valid slots: out = softmax(q k^T) v for its R = G * n
// query rows (row r = g * n + i is query head h * G + g, query i; out [R, D] float32, rows
// contiguous), and updates scores[b, h, :L] when scoring. scratch: per-thread work space of
// scratch_floats(R, D, Lmax) floats (uninitialised; Lmax >= L).
struct Kernel {
  int64_t (*scratch_floats)(int64_t R, int64_t D, int64_t Lmax);
  void (*run)(const Args&, int64_t b, int64_t h, int64_t L, float* scratch, float* out);
  int64_t lanes;  // floats per vector register of this build
};

// The kernel of a dtype for each instruction set built (namespaces base, avx2, avx512).
#define INF_MLLM_DECLARE_DECODE_ISA(ns) \
  namespace ns {                        \
  Kernel kernel_for(DType dtype);       \
  }
INF_MLLM_DECLARE_DECODE_ISA(base)
INF_MLLM_DECLARE_DECODE_ISA(avx2)
INF_MLLM_DECLARE_DECODE_ISA(avx512)
#undef INF_MLLM_DECLARE_DECODE_ISA

}  // namespace decode
}  // namespace inf_mllm
