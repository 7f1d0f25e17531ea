// CUDA kernels of compact_ (SPEC §4.2). Torch-free: raw pointers and plain ints only.
//
// Two kernels, stream-ordered, no host synchronisation:
//  1. compact_select_kernel, one block per (row, KV head). Reads length[b] on the device and
//     exits early (writing arange) when the row is within budget. Otherwise it finds the
//     n_mid-th largest score key of the middle slots with a 4-pass, 8-bit radix select over
//     the order-preserving uint32 image of the float scores (NaN highest, -0 == +0), then
//     walks the middle in slot order with block-wide ballot scans, keeping every key above
//     the threshold and the first `need` keys equal to it (ties go to the lower slot).
//     The kept list goes to idx[b, h, :budget]; the row's scores are zeroed or moved.
//     The keys are cached in shared memory when C of them fit (C <= ~56K on H100), so global
//     memory is read once; beyond that every pass re-reads the scores (from L2), any C works.
//  2. compact_move_kernel, grid (row*head, work item). A work item is one plane (k, v or an
//     extra) and a column chunk of its per-slot bytes, so a (row, head) is moved by several
//     blocks in parallel (columns are independent). Each block walks the kept slots in tiles:
//     all threads load a tile of sources into registers, __syncthreads, then store. Because
//     keep[] is increasing with keep[i] >= i, a later tile never reads a slot that an earlier
//     tile wrote, and every read of a tile precedes (through the barrier) every write of later
//     tiles, so the overlapping in-place move is safe. Copies are 16-byte vectors when the row
//     and base allow it (8/4/2/1 otherwise). Identity rows exit at once; a warp-wide 32-ary
//     search skips the unmoved prefix. Block (b, h=0, item 0) sets length[b] = budget.
#include "compact_kernels.cuh"

#include "../compact_common.h"

namespace inf_mllm {
namespace cuda {
namespace {

constexpr int kSelectThreads = 512;
constexpr int kMoveThreads = 256;
constexpr int kMaxItems = 96;

struct MoveItem {
  char* base;         // plane base pointer ([B, H, C, row_bytes] bytes)
  int64_t row_bytes;  // bytes per slot
  int32_t vec_bytes;  // 16, 8, 4, 2 or 1
  int32_t col0;       // first vector of the chunk within a slot
  int32_t nvec;       // vectors of the chunk
  int32_t pad;
};

struct MoveItems {
  MoveItem it[kMaxItems];
};

// Exclusive block-wide prefix count of a predicate; *total receives the block-wide count.
// Every thread of the block must call it. warp_counts: shared, >= blockDim.x / 32 ints.
template <int BLOCK>
__device__ __forceinline__ int block_excl_count(bool pred, int* warp_counts, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned bal = __ballot_sync(0xffffffffu, pred);
  const int in_warp = __popc(bal & ((1u << lane) - 1u));
  if (lane == 0) warp_counts[warp] = __popc(bal);
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < BLOCK / 32; ++w) {
    const int c = warp_counts[w];
    before += (w < warp) ? c : 0;
    all += c;
  }
  __syncthreads();  // warp_counts reusable afterwards
  *total = all;
  return before + in_warp;
}

// sm_89 (RTX 4090 / 4090 D) holds 1536 threads per SM: for three 512-thread blocks ptxas caps the
// select kernel at 40 registers and spills; two blocks per SM let it keep everything in registers
// (63). sm_80 / sm_90 (2048 threads per SM) fit it in 32 registers at full occupancy, unchanged.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 890
#define INF_MLLM_SELECT_BOUNDS(block) __launch_bounds__(block, 2)
#else
#define INF_MLLM_SELECT_BOUNDS(block) __launch_bounds__(block)
#endif

// CACHE: the middle's keys are kept in dynamic shared memory (>= C uint32) after the first
// radix pass, so the later passes and the compaction do not re-read global memory.
template <int BLOCK, bool CACHE>
__global__ void INF_MLLM_SELECT_BOUNDS(BLOCK) compact_select_kernel(float* __restrict__ scores, const int32_t* __restrict__ length,
                                                               int64_t* __restrict__ idx, int H, int C, int budget, int n_sink,
                                                               int n_recent, bool reset_scores) {
  const int bh = blockIdx.x;
  const int b = bh / H;
  int64_t* keep = idx + static_cast<int64_t>(bh) * budget;
  int L = length[b];
  L = L < 0 ? 0 : (L > C ? C : L);
  if (L <= budget) {  // untouched row (block-uniform branch)
    for (int i = threadIdx.x; i < budget; i += BLOCK) keep[i] = i;
    return;
  }
  float* s = scores + static_cast<int64_t>(bh) * C;
  const int n_mid = budget - n_sink - n_recent;
  const int lo = n_sink, hi = L - n_recent;  // middle [lo, hi) holds more than n_mid slots

  extern __shared__ unsigned cached_keys[];  // [hi - lo] when CACHE
  __shared__ unsigned hist[256];
  __shared__ int warp_counts[BLOCK / 32];
  __shared__ unsigned s_digit;
  __shared__ int s_kk;

  for (int i = threadIdx.x; i < n_sink; i += BLOCK) keep[i] = i;
  for (int j = threadIdx.x; j < n_recent; j += BLOCK) keep[budget - n_recent + j] = hi + j;

  if (n_mid > 0) {
    // Radix select of the n_mid-th largest key: 4 passes of 8 bits, most significant first.
    unsigned prefix = 0u, mask = 0u;
    int kk = n_mid;  // rank still to find among keys matching `prefix` under `mask`
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += BLOCK) hist[i] = 0u;
      __syncthreads();
      // Warp-uniform loop; lanes with the same bin add once (scores often share top bytes,
      // which would serialise plain shared-memory atomics on a few bins).
      for (int base = lo; base < hi; base += BLOCK) {
        const int i = base + threadIdx.x;
        unsigned bin = 256u;  // no bin
        if (i < hi) {
          unsigned key;
          if (CACHE && shift == 24) {
            key = score_key(s[i]);
            cached_keys[i - lo] = key;
          } else {
            key = CACHE ? cached_keys[i - lo] : score_key(s[i]);
          }
          if ((key & mask) == prefix) bin = (key >> shift) & 255u;
        }
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (bin < 256u && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        // lane l owns bins 255-8l .. 248-8l (descending); find the bin holding rank kk.
        const int lane = threadIdx.x;
        unsigned c[8];
        unsigned sum = 0u;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          c[j] = hist[255 - 8 * lane - j];
          sum += c[j];
        }
        unsigned incl = sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned t = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += t;
        }
        const unsigned excl = incl - sum;
        const bool hit = excl < static_cast<unsigned>(kk) && static_cast<unsigned>(kk) <= incl;
        const unsigned bal = __ballot_sync(0xffffffffu, hit);
        if (lane == __ffs(bal) - 1) {
          unsigned cum = excl;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (cum + c[j] >= static_cast<unsigned>(kk)) {
              s_digit = static_cast<unsigned>(255 - 8 * lane - j);
              s_kk = kk - static_cast<int>(cum);
              break;
            }
            cum += c[j];
          }
        }
      }
      __syncthreads();
      prefix |= s_digit << shift;
      mask |= 255u << shift;
      kk = s_kk;
      // No barrier needed here: hist/s_digit/s_kk are next written after the next
      // iteration's first barrier, which every thread reaches after these reads.
    }
    const unsigned thr = prefix;  // key of the n_mid-th best
    const int need_eq = kk;       // how many keys equal to thr are kept (lowest slots first)

    // Ordered compaction of the selected middle slots into keep[n_sink ...].
    int sel_base = 0, eq_base = 0;
    for (int base = lo; base < hi && sel_base < n_mid; base += BLOCK) {
      const int i = base + threadIdx.x;
      const bool valid = i < hi;
      const unsigned key = valid ? (CACHE ? cached_keys[i - lo] : score_key(s[i])) : 0u;
      const bool gt = valid && key > thr;
      const bool eq = valid && key == thr;
      int eq_total, sel_total;
      const int eq_rank = eq_base + block_excl_count<BLOCK>(eq, warp_counts, &eq_total);
      const bool sel = gt || (eq && eq_rank < need_eq);
      const int pos = sel_base + block_excl_count<BLOCK>(sel, warp_counts, &sel_total);
      if (sel) keep[n_sink + pos] = i;
      sel_base += sel_total;
      eq_base += eq_total;
    }
  }
  __syncthreads();  // keep[] complete and visible; every read of s[] for selection done

  if (reset_scores) {
    for (int i = threadIdx.x; i < C; i += BLOCK) s[i] = 0.0f;
  } else {
    constexpr int R = 4;
    for (int t0 = 0; t0 < budget; t0 += R * BLOCK) {
      float val[R];
      int dst[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int i = t0 + r * BLOCK + threadIdx.x;
        dst[r] = -1;
        if (i < budget) {
          const int64_t src = keep[i];
          if (src != i) {
            val[r] = s[src];
            dst[r] = i;
          }
        }
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (dst[r] >= 0) s[dst[r]] = val[r];
    }
    for (int i = budget + threadIdx.x; i < C; i += BLOCK) s[i] = 0.0f;
  }
}

template <typename VT, int R>
__device__ __forceinline__ void move_tiles(char* __restrict__ colbase, int64_t row_bytes, unsigned nvec,
                                           const int64_t* __restrict__ keep, int first, int budget) {
  const unsigned total = static_cast<unsigned>(budget - first) * nvec;
  for (unsigned t0 = 0; t0 < total; t0 += R * blockDim.x) {
    VT regs[R];
    int64_t dst[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const unsigned e = t0 + r * blockDim.x + threadIdx.x;
      dst[r] = -1;
      if (e < total) {
        const int64_t i = first + static_cast<int64_t>(e / nvec);
        const unsigned c = e % nvec;
        const int64_t src = __ldg(keep + i);
        if (src != i) {
          regs[r] = *reinterpret_cast<const VT*>(colbase + src * row_bytes + c * sizeof(VT));
          dst[r] = i * row_bytes + c * sizeof(VT);
        }
      }
    }
    __syncthreads();  // every source of this tile is in registers before any write
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (dst[r] >= 0) *reinterpret_cast<VT*>(colbase + dst[r]) = regs[r];
  }
}

__global__ void __launch_bounds__(kMoveThreads) compact_move_kernel(const int64_t* __restrict__ idx, const MoveItems items,
                                                                    int32_t* __restrict__ length, int H, int C, int budget,
                                                                    bool set_length) {
  const int bh = blockIdx.x;
  if (set_length && blockIdx.y == 0 && threadIdx.x == 0 && bh % H == 0) {
    const int b = bh / H;
    if (length[b] > budget) length[b] = budget;
  }
  const int64_t* keep = idx + static_cast<int64_t>(bh) * budget;
  if (__ldg(keep + budget - 1) == budget - 1) return;  // identity: untouched row or nothing moved

  // First moved slot: keep[i] != i holds exactly on a suffix that contains budget-1.
  __shared__ int s_first;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int a = 0, z = budget - 1;  // answer in [a, z]
    while (z - a >= 32) {
      const int step = (z - a + 31) / 32;
      const int p = min(a + lane * step, z);
      const unsigned bal = __ballot_sync(0xffffffffu, __ldg(keep + p) != p);
      if (bal) {
        const int f = __ffs(bal) - 1;
        const int pf = min(a + f * step, z);
        a = f > 0 ? min(a + (f - 1) * step, z) + 1 : a;
        z = pf;
      } else {
        a = min(a + 31 * step, z) + 1;
      }
    }
    const int p = min(a + lane, z);
    const unsigned bal = __ballot_sync(0xffffffffu, __ldg(keep + p) != p);
    if (lane == 0) s_first = a + __ffs(bal) - 1;
  }
  __syncthreads();
  const int first = s_first;

  const MoveItem it = items.it[blockIdx.y];
  char* colbase = it.base + static_cast<int64_t>(bh) * C * it.row_bytes + static_cast<int64_t>(it.col0) * it.vec_bytes;
  const unsigned nvec = static_cast<unsigned>(it.nvec);
  switch (it.vec_bytes) {
    case 16: move_tiles<uint4, 8>(colbase, it.row_bytes, nvec, keep, first, budget); break;
    case 8: move_tiles<uint2, 8>(colbase, it.row_bytes, nvec, keep, first, budget); break;
    case 4: move_tiles<unsigned, 8>(colbase, it.row_bytes, nvec, keep, first, budget); break;
    case 2: move_tiles<unsigned short, 8>(colbase, it.row_bytes, nvec, keep, first, budget); break;
    default: move_tiles<unsigned char, 8>(colbase, it.row_bytes, nvec, keep, first, budget); break;
  }
}

}  // namespace

cudaError_t launch_compact_select(float* scores, const int32_t* length, int64_t* idx, int B, int H, int C, int budget,
                                  int n_sink, int n_recent, bool reset_scores, cudaStream_t stream) {
  if (B <= 0 || H <= 0 || budget <= 0) return cudaSuccess;
  // Cache the keys in shared memory when C of them fit (opt-in limit of the device).
  int dev = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const size_t static_smem = 2048;  // hist, warp counts, scalars (upper bound)
  const size_t cache_bytes = static_cast<size_t>(C) * sizeof(unsigned);
  if (cache_bytes + static_smem <= static_cast<size_t>(smem_optin)) {
    auto kernel = compact_select_kernel<kSelectThreads, true>;
    if (cache_bytes + static_smem > 48 * 1024) {  // static + dynamic above the default needs the opt-in
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cache_bytes));
      if (err != cudaSuccess) return err;
    }
    kernel<<<dim3(B * H), dim3(kSelectThreads), cache_bytes, stream>>>(scores, length, idx, H, C, budget, n_sink,
                                                                       n_recent, reset_scores);
  } else {
    compact_select_kernel<kSelectThreads, false><<<dim3(B * H), dim3(kSelectThreads), 0, stream>>>(
        scores, length, idx, H, C, budget, n_sink, n_recent, reset_scores);
  }
  return cudaGetLastError();
}

cudaError_t launch_compact_move(const int64_t* idx, char* const* bases, const int64_t* row_bytes, int n_planes,
                                int32_t* length, int B, int H, int C, int budget, int num_sms, cudaStream_t stream) {
  if (B <= 0 || H <= 0 || budget <= 0) return cudaSuccess;
  if (num_sms <= 0) num_sms = 132;
  const int64_t rows = static_cast<int64_t>(B) * H;
  const int64_t target_blocks = 2 * static_cast<int64_t>(num_sms);
  // Build the work items: (plane, column chunk of its slot bytes, vector width).
  MoveItems items;
  int n_items = 0;
  auto launch = [&](bool last) -> cudaError_t {
    if (n_items == 0) {  // nothing to move (only possible without planes): still set length
      items.it[0] = MoveItem{nullptr, 0, 1, 0, 0, 0};
      n_items = 1;
    }
    compact_move_kernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(n_items)), dim3(kMoveThreads), 0,
                          stream>>>(idx, items, length, H, C, budget, last);
    n_items = 0;
    return cudaGetLastError();
  };
  for (int p = 0; p < n_planes; ++p) {
    const int64_t rb = row_bytes[p];
    if (rb <= 0) continue;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(bases[p]);
    int w = 16;
    while (w > 1 && ((rb % w) != 0 || (addr % w) != 0)) w >>= 1;
    const int64_t nvec_total = rb / w;
    // Split wide planes by columns so that small B*H still fills the GPU; keep >= 64 B per
    // chunk per slot, and keep budget * chunk within 32-bit tile arithmetic.
    int64_t splits = (target_blocks + rows * n_planes - 1) / (rows * n_planes);
    const int64_t min_vecs = (64 + w - 1) / w;
    splits = splits < 1 ? 1 : splits;
    if (splits > nvec_total / min_vecs) splits = nvec_total / min_vecs > 0 ? nvec_total / min_vecs : 1;
    while ((nvec_total + splits - 1) / splits * static_cast<int64_t>(budget) >= (int64_t(1) << 31)) ++splits;
    const int64_t chunk = (nvec_total + splits - 1) / splits;
    for (int64_t c0 = 0; c0 < nvec_total; c0 += chunk) {
      if (n_items == kMaxItems) {  // more work items than one launch carries
        const cudaError_t err = launch(false);
        if (err != cudaSuccess) return err;
      }
      MoveItem& it = items.it[n_items++];
      it.base = bases[p];
      it.row_bytes = rb;
      it.vec_bytes = w;
      it.col0 = static_cast<int32_t>(c0);
      it.nvec = static_cast<int32_t>(c0 + chunk <= nvec_total ? chunk : nvec_total - c0);
      it.pad = 0;
    }
  }
  return launch(true);
}

}  // namespace cuda
}  // namespace inf_mllm
