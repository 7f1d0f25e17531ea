// One instruction set's build of the fused CPU decode kernel (csrc/attention_cpu_kernel.h).
// CMakeLists.txt compiles this file once per ISA with -DINF_MLLM_ISA=<namespace> and that ISA's
// flags (base: the compiler's default target; on x86-64 also avx2: -mavx2 -mfma -mf16c, and
// avx512: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma); csrc/attention_cpu.cpp picks one
// at run time from the CPU's features.
#include "attention_cpu_kernel.h"
