// CPU kernel of compact_ (SPEC §4.2): parallel over (row, KV head); selection by
// std::nth_element on (score desc, slot asc); ordered in-place forward move.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "compact.h"
#include "compact_common.h"

namespace inf_mllm {
namespace {

// A run of kept slots that are contiguous both at the source and at the destination.
struct Run {
  int64_t dst, src, n;
};

// Splits keep[first, budget) into maximal runs with keep[i + 1] == keep[i] + 1.
inline void make_runs(const int64_t* keep, int64_t first, int64_t budget, std::vector<Run>& runs) {
  runs.clear();
  for (int64_t i = first; i < budget;) {
    int64_t j = i + 1;
    while (j < budget && keep[j] == keep[i] + (j - i)) ++j;
    if (keep[i] != i) runs.push_back({i, keep[i], j - i});
    i = j;
  }
}

// Moves rows keep[i] -> i in a [C, row_bytes] plane, run by run in increasing order. keep is
// strictly increasing with keep[i] >= i, so a destination never lies after its source and
// never at a source of a later run (those are >= their own destinations > this run's):
// a forward pass of memmoves (a run may overlap itself) is safe in place.
inline void move_runs(char* base, int64_t row_bytes, const std::vector<Run>& runs) {
  for (const Run& r : runs)
    std::memmove(base + r.dst * row_bytes, base + r.src * row_bytes, static_cast<size_t>(r.n * row_bytes));
}

}  // namespace

at::Tensor compact_cpu(at::Tensor& k, at::Tensor& v, at::Tensor& scores, at::Tensor& length,
                       at::TensorList extras, int64_t budget, int64_t n_sink, int64_t n_recent,
                       bool reset_scores, bool return_indices) {
  check_compact_args(k, v, scores, length, extras, budget, n_sink, n_recent);
  TORCH_CHECK(k.device().is_cpu(), "inf_mllm::compact_ (CPU kernel): tensors must be on the CPU");
  const int64_t B = k.size(0), H = k.size(1), C = k.size(2), D = k.size(3);

  // Read lengths once, before any row is modified (length[b] is written at the end).
  std::vector<int64_t> L(B);
  const int32_t* len_ptr = length.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    L[b] = len_ptr[b];
    TORCH_CHECK(L[b] >= 0 && L[b] <= C, "inf_mllm::compact_: length[", b, "]=", L[b],
                " is outside [0, C=", C, "]");
  }

  at::Tensor idx = return_indices ? at::empty({B, H, budget}, k.options().dtype(at::kLong))
                                  : at::empty({0}, k.options().dtype(at::kLong));
  int64_t* idx_ptr = return_indices ? idx.data_ptr<int64_t>() : nullptr;

  // Every tensor that moves with its tokens, as (base pointer, bytes per slot).
  struct Plane { char* base; int64_t row_bytes; };
  std::vector<Plane> planes;
  planes.push_back({static_cast<char*>(k.data_ptr()), D * static_cast<int64_t>(k.element_size())});
  planes.push_back({static_cast<char*>(v.data_ptr()), D * static_cast<int64_t>(v.element_size())});
  for (const auto& e : extras) planes.push_back({static_cast<char*>(e.data_ptr()), static_cast<int64_t>(e.element_size())});
  float* sc = scores.data_ptr<float>();
  const int64_t n_mid = budget - n_sink - n_recent;

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keep(static_cast<size_t>(budget));
    std::vector<uint64_t> cand;
    std::vector<Run> runs;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const int64_t len = L[b];
      int64_t* out = idx_ptr ? idx_ptr + bh * budget : nullptr;
      if (len <= budget) {
        if (out) for (int64_t i = 0; i < budget; ++i) out[i] = i;
        continue;
      }
      float* s = sc + bh * C;
      // keep = [0, n_sink) ++ top-n_mid of [n_sink, len - n_recent) in slot order ++ recent.
      for (int64_t i = 0; i < n_sink; ++i) keep[i] = i;
      for (int64_t j = 0; j < n_recent; ++j) keep[budget - n_recent + j] = len - n_recent + j;
      if (n_mid > 0) {
        const int64_t lo = n_sink, hi = len - n_recent;  // hi - lo > n_mid since len > budget
        cand.resize(static_cast<size_t>(hi - lo));
        // Ascending order of (~key << 32 | slot) is (score desc, slot asc).
        for (int64_t i = lo; i < hi; ++i)
          cand[i - lo] = (static_cast<uint64_t>(~score_key(s[i])) << 32) | static_cast<uint64_t>(i);
        std::nth_element(cand.begin(), cand.begin() + (n_mid - 1), cand.end());
        const uint64_t thr = cand[n_mid - 1];  // the n_mid-th best: selected iff value <= thr
        int64_t r = n_sink;
        for (int64_t i = lo; i < hi && r < n_sink + n_mid; ++i) {
          const uint64_t c = (static_cast<uint64_t>(~score_key(s[i])) << 32) | static_cast<uint64_t>(i);
          if (c <= thr) keep[r++] = i;
        }
      }
      // First slot that actually moves (keep[i] == i holds on a prefix only).
      int64_t first = 0;
      for (int64_t top = budget; first < top;) {
        const int64_t m = (first + top) / 2;
        if (keep[m] == m) first = m + 1; else top = m;
      }
      make_runs(keep.data(), first, budget, runs);
      for (const Plane& p : planes) move_runs(p.base + bh * C * p.row_bytes, p.row_bytes, runs);
      if (reset_scores) {
        std::memset(s, 0, sizeof(float) * static_cast<size_t>(C));
      } else {
        move_runs(reinterpret_cast<char*>(s), sizeof(float), runs);
        std::memset(s + budget, 0, sizeof(float) * static_cast<size_t>(C - budget));
      }
      if (out) std::copy(keep.begin(), keep.end(), out);
    }
  });

  int32_t* len_out = length.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    if (L[b] > budget) len_out[b] = static_cast<int32_t>(budget);
  return idx;
}

TORCH_LIBRARY_IMPL(inf_mllm, CPU, m) { m.impl("compact_", &compact_cpu); }

}  // namespace inf_mllm
