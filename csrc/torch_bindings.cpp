// Operator schema of the native library inf_mllm/_C (loaded by inf_mllm/ops.py through
// torch.ops.load_library). Backend kernels are registered beside their implementations:
// compact_cpu.cpp (CPU) and cuda/compact_cuda.cpp (CUDA); rope_cpu.cpp (CPU only: a helper of
// the CPU path of attention_with_scores). The fake (meta) kernels live in inf_mllm/ops.py
// (torch.library.register_fake).
#include <torch/library.h>

TORCH_LIBRARY(inf_mllm, m) {
  m.def(
      "compact_(Tensor(a!) k, Tensor(b!) v, Tensor(c!) scores, Tensor(d!) length, "
      "Tensor(e!)[] extras, int budget, int n_sink, int n_recent, bool reset_scores, "
      "bool return_indices) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}
