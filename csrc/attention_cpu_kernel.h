// Arithmetic of the fused CPU decode attention (see attention_cpu.h), included by
// attention_cpu_isa.cpp once per instruction set with INF_MLLM_ISA naming the namespace.
// GCC/Clang vector extensions (a vector of W floats: 16 with AVX-512, 8 with AVX2, 4 otherwise)
// and plain loops the compiler vectorises; no intrinsics, no torch headers, and every helper has
// internal linkage (anonymous namespace), so nothing compiled for a wider ISA can leak into the
// code paths of another.
//
// Per (row b, KV head h) with L valid slots and R = G * n query rows (query i at slot
// t_i = L - n + i, which sees slots j <= t_i), head dim D padded with zeros to Dp (a multiple
// of W) in the scratch copies:
//   1. the queries are loaded (converted to float32), rotated at t_i (RoPE), scaled;
//   2. one pass over the keys in tiles of W slots: each key is loaded and rotated at its slot
//      (into a scratch tile; float32 keys without RoPE are read in place), and every query row
//      gets the W logits of the tile at once: W independent dot-product accumulators, summed
//      across lanes by a transpose-and-add tree -> logits [R, L] (float32 scratch);
//   3. softmax of each row in place over the slots it sees (max, exp, sum, normalise); the
//      slots it does not see get p = 0: p [R, L];
//   4. one pass over the values in tiles of T slots: acc[r] += p[r, j] * v_j with up to 8 rows'
//      accumulators of one W-wide column chunk held in registers;
//   5. when scoring, scores[j] = decay * scores[j] + mean_g(sum of the window rows' p[., j])
//      + the window's bias for slot j (absolute or relative), for j < L.
// Slots j >= L are never read or written.
#pragma once

#include <cstdint>
#include <utility>

#include "attention_cpu.h"

#ifndef INF_MLLM_ISA
#error "define INF_MLLM_ISA (the namespace of this instruction set) before including attention_cpu_kernel.h"
#endif

namespace inf_mllm {
namespace decode {
namespace INF_MLLM_ISA {
namespace {

// Width of the lane arrays of the plain loops below (kLanes) and of the vector type vf (W).
constexpr int64_t kLanes = 16;
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(sizeof(float) * W)));
typedef float vf_u __attribute__((vector_size(sizeof(float) * W), aligned(4), may_alias));

inline vf loadu(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void storeu(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }

#if defined(__has_builtin) && !defined(INF_MLLM_NO_SHUFFLEVECTOR)
#if __has_builtin(__builtin_shufflevector)
#define INF_MLLM_HAS_SHUFFLEVECTOR 1
#endif
#endif

#ifdef INF_MLLM_HAS_SHUFFLEVECTOR
// fold<S>(x, y): for each group of 2S lanes, the first S lanes get x's two S-halves added, the
// last S lanes y's. Applied with S = 1, 2, .., W/2 to W vectors pairwise, lane u of the one
// vector left holds the sum of all lanes of vector u.
template <int S>
constexpr int fold_a(int l) {
  return l % (2 * S) < S ? l : W + l - S;
}
template <int S>
constexpr int fold_b(int l) {
  return l % (2 * S) < S ? l + S : W + l;
}
template <int S, int... I>
inline vf fold(vf x, vf y, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(x, y, fold_a<S>(I)...) + __builtin_shufflevector(x, y, fold_b<S>(I)...);
}
template <int S>
inline void fold_level(vf* a) {
  for (int m = 0; m < W / (2 * S); ++m) a[m] = fold<S>(a[2 * m], a[2 * m + 1], std::make_integer_sequence<int, W>{});
}
inline vf lane_sums(vf* a) {  // a[W] -> (sum of a[0], .., sum of a[W - 1]); a is overwritten
  fold_level<1>(a);
  fold_level<2>(a);
  if constexpr (W >= 8) fold_level<4>(a);
  if constexpr (W >= 16) fold_level<8>(a);
  return a[0];
}
#else
// Compilers without __builtin_shufflevector (GCC < 12): the lane sums one vector at a time.
inline vf lane_sums(vf* a) {
  vf r;
  for (int u = 0; u < W; ++u) {
    float t = 0.f;
    for (int l = 0; l < W; ++l) t += a[u][l];
    r[u] = t;
  }
  return r;
}
#endif

inline float as_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t as_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

struct LoadF32 {
  using T = float;
  static inline float load(float x) { return x; }
};

struct LoadBF16 {
  using T = uint16_t;
  static inline float load(uint16_t x) { return as_float(static_cast<uint32_t>(x) << 16); }
};

// IEEE half -> float, branch-free (selects), exact for normals, subnormals, inf and NaN.
struct LoadF16 {
  using T = uint16_t;
  static inline float load(uint16_t x) {
    const uint32_t h = x;
    const uint32_t mag = h & 0x7fffu;           // exponent and mantissa
    const uint32_t sign = (h & 0x8000u) << 16;
    uint32_t norm = (mag << 13) + (112u << 23);  // rebias the exponent 15 -> 127
    norm = mag >= 0x7c00u ? norm + (112u << 23) : norm;  // inf / NaN: exponent 31 -> 255
    const float sub = static_cast<float>(static_cast<int32_t>(mag)) * 5.9604644775390625e-08f;  // m * 2^-24
    return as_float((mag < 0x0400u ? as_bits(sub) : norm) | sign);
  }
};

template <class Ld>
inline void load_row(const typename Ld::T* __restrict__ x, float* __restrict__ o, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] = Ld::load(x[d]);
}

// x * cos + rotate_half(x) * sin (Llama convention), converted on load; hd = D / 2. The same
// arithmetic as inf_mllm::rope (csrc/rope_cpu.cpp).
template <class Ld>
inline void load_rot(const typename Ld::T* __restrict__ x, const float* __restrict__ c, const float* __restrict__ s,
                     float* __restrict__ o, int64_t hd) {
  for (int64_t d = 0; d < hd; ++d) {
    const float a = Ld::load(x[d]);
    const float b = Ld::load(x[d + hd]);
    o[d] = a * c[d] - b * s[d];
    o[d + hd] = b * c[d + hd] + a * s[d + hd];
  }
}

inline void scale_row(float* __restrict__ x, float f, int64_t D) {
  for (int64_t d = 0; d < D; ++d) x[d] *= f;
}

inline vf splat(float x) { return vf{} + x; }

inline float row_max(const float* __restrict__ p, int64_t len) {
  vf m = splat(-__builtin_inff());
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    const vf x = loadu(p + j);
    m = x > m ? x : m;
  }
  float r = -__builtin_inff();
  for (; j < len; ++j) r = p[j] > r ? p[j] : r;
  for (int u = 0; u < W; ++u) r = m[u] > r ? m[u] : r;
  return r;
}

// exp(x) for x <= 0 (logit minus the row max), to ~2 ulp; 0 below -87 (where float32 exp
// underflows to subnormals anyway). Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, a
// degree-6 polynomial for exp(r), and 2^k built in the exponent bits. V: float or vf (the
// same arithmetic, lane by lane).
template <class V>
inline V exp_poly(V xc, V kf) {
  V r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.f;
}

inline float exp_nonpos(float x) {
  const float xc = x < -87.f ? -87.f : x;
  const float kf = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const float two_k = as_float(static_cast<uint32_t>(static_cast<int32_t>(kf) + 127) << 23);
  return x < -87.f ? 0.f : exp_poly(xc, kf) * two_k;
}

typedef int32_t vi __attribute__((vector_size(sizeof(int32_t) * W)));

inline vf exp_nonpos(vf x) {
  const vf lo = splat(-87.f);
  const vf xc = x < lo ? lo : x;
  const vf kf = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const vi e = (__builtin_convertvector(kf, vi) + 127) << 23;
  const vf two_k = reinterpret_cast<const vf&>(e);
  return x < lo ? vf{} : exp_poly(xc, kf) * two_k;
}

// p[j] = exp(p[j] - m) for j < len; returns their sum.
inline float exp_sum(float* __restrict__ p, float m, int64_t len) {
  vf acc = vf{};
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    const vf e = exp_nonpos(loadu(p + j) - m);
    storeu(p + j, e);
    acc += e;
  }
  float s = 0.f;
  for (; j < len; ++j) {
    const float e = exp_nonpos(p[j] - m);
    p[j] = e;
    s += e;
  }
  for (int u = 0; u < W; ++u) s += acc[u];
  return s;
}

inline void add_row(float* __restrict__ y, const float* __restrict__ x, int64_t len) {
  for (int64_t j = 0; j < len; ++j) y[j] += x[j];
}

inline void fill(float* __restrict__ y, float val, int64_t len) {
  for (int64_t j = 0; j < len; ++j) y[j] = val;
}

// sc[j] = sc[j] * decay + col[j] * inv_g + bw * (j + j0), j < len (bw = 0: no bias).
inline void score_update(float* __restrict__ sc, const float* __restrict__ col, int64_t len, float decay, float inv_g,
                         float bw, int64_t j0) {
  for (int64_t j = 0; j < len; ++j)
    sc[j] = sc[j] * decay + (col[j] * inv_g + bw * static_cast<float>(j + j0));
}

// The logits of one query row (Dp floats) against a tile of W keys (rows of Dp floats, stride
// Dp): W independent accumulators, then one transpose-and-add tree.
inline vf tile_dots(const float* __restrict__ qr, const float* __restrict__ kt, int64_t Dp) {
  vf acc[W];
  for (int u = 0; u < W; ++u) acc[u] = vf{};
  for (int64_t c = 0; c < Dp; c += W) {
    const vf qc = loadu(qr + c);
    for (int u = 0; u < W; ++u) acc[u] += qc * loadu(kt + u * Dp + c);
  }
  return lane_sums(acc);
}

// acc[i] += sum_j p[i * ps + j] * vt[j] for RB rows, nj value rows of Dp floats (stride Dp):
// CB column chunks (W floats each) of the RB rows are accumulated in registers across the tile,
// RB * CB independent FMA chains.
template <int RB, int CB>
inline void pv_rows(float* __restrict__ acc, const float* __restrict__ p, int64_t ps, const float* __restrict__ vt,
                    int64_t nj, int64_t Dp) {
  for (int64_t c = 0; c < Dp; c += CB * W) {
    vf a[RB][CB];
    for (int i = 0; i < RB; ++i)
      for (int e = 0; e < CB; ++e) a[i][e] = loadu(acc + i * Dp + c + e * W);
    for (int64_t j = 0; j < nj; ++j) {
      vf x[CB];
      for (int e = 0; e < CB; ++e) x[e] = loadu(vt + j * Dp + c + e * W);
      for (int i = 0; i < RB; ++i) {
        const float pij = p[i * ps + j];
        for (int e = 0; e < CB; ++e) a[i][e] += pij * x[e];
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int e = 0; e < CB; ++e) storeu(acc + i * Dp + c + e * W, a[i][e]);
  }
}

// Accumulator registers for pv_rows (of 16 vector registers with AVX2 / SSE, 32 with AVX-512).
constexpr int kAccRegs = W == 16 ? 24 : 12;

// Rows per pass over a value tile for CB chunks at a time.
constexpr int row_block(int cb) { return kAccRegs / cb < 8 ? kAccRegs / cb : 8; }

template <int CB>
inline void pv_block_cb(float* acc, const float* p, int64_t ps, const float* vt, int64_t nj, int64_t Dp, int64_t rb) {
  constexpr int RBMAX = row_block(CB);
  switch (rb) {
    case 1: pv_rows<1, CB>(acc, p, ps, vt, nj, Dp); break;
    case 2: pv_rows<2, CB>(acc, p, ps, vt, nj, Dp); break;
    case 3: pv_rows<3 <= RBMAX ? 3 : 1, CB>(acc, p, ps, vt, nj, Dp); break;
    case 4: pv_rows<4 <= RBMAX ? 4 : 1, CB>(acc, p, ps, vt, nj, Dp); break;
    case 5: pv_rows<5 <= RBMAX ? 5 : 1, CB>(acc, p, ps, vt, nj, Dp); break;
    case 6: pv_rows<6 <= RBMAX ? 6 : 1, CB>(acc, p, ps, vt, nj, Dp); break;
    case 7: pv_rows<7 <= RBMAX ? 7 : 1, CB>(acc, p, ps, vt, nj, Dp); break;
    default: pv_rows<8 <= RBMAX ? 8 : 1, CB>(acc, p, ps, vt, nj, Dp); break;
  }
}

// acc [R, Dp] += p [R, nj] (row stride ps) @ vt [nj, Dp], in blocks of rows.
inline void pv_tile(float* acc, const float* p, int64_t ps, const float* vt, int64_t nj, int64_t Dp, int64_t R) {
  const int64_t nc = Dp / W;
  const int cb = nc % 4 == 0 ? 4 : nc % 2 == 0 ? 2 : 1;
  const int64_t rbmax = row_block(cb);
  for (int64_t r0 = 0; r0 < R; r0 += rbmax) {
    const int64_t rb = R - r0 < rbmax ? R - r0 : rbmax;
    float* ar = acc + r0 * Dp;
    const float* pr = p + r0 * ps;
    if (cb == 4)
      pv_block_cb<4>(ar, pr, ps, vt, nj, Dp, rb);
    else if (cb == 2)
      pv_block_cb<2>(ar, pr, ps, vt, nj, Dp, rb);
    else
      pv_block_cb<1>(ar, pr, ps, vt, nj, Dp, rb);
  }
}

inline int64_t padded(int64_t D) { return (D + W - 1) / W * W; }
// Slots per value tile: about 16 KiB of float32 (stays in L1 while every row block reads it).
inline int64_t value_tile(int64_t Dp) {
  const int64_t t = (4096 / Dp) / W * W;
  return t > W ? t : W;
}

// Scratch: q [R, Dp] | logits [R, Lmax] | acc [R, Dp] | key tile [W, Dp] | value tile [T, Dp] |
// col [Lmax] | tail [W].
int64_t scratch_floats(int64_t R, int64_t D, int64_t Lmax) {
  const int64_t Dp = padded(D);
  return 2 * R * Dp + R * Lmax + W * Dp + value_tile(Dp) * Dp + Lmax + W;
}

template <class Ld>
void decode_bh(const Args& a, int64_t b, int64_t h, int64_t L, float* scratch, float* out) {
  using T = typename Ld::T;
  constexpr bool kF32 = sizeof(T) == sizeof(float);
  const int64_t G = a.G, n = a.n, D = a.D, C = a.C, R = G * n, hd = D / 2;
  const int64_t Dp = padded(D), VT = value_tile(Dp);
  const int64_t first = L - n;  // slot of query 0
  // the G * n query rows of KV head h are one contiguous block of q [B, Hq, n, D]
  const T* q = static_cast<const T*>(a.q) + (b * a.Hkv * G + h * G) * n * D;
  const T* k = static_cast<const T*>(a.k) + (b * a.Hkv + h) * C * D;
  const T* v = static_cast<const T*>(a.v) + (b * a.Hkv + h) * C * D;
  const bool rope = a.cos != nullptr;

  float* qs = scratch;
  float* logits = qs + R * Dp;
  float* acc = logits + R * L;
  float* kb = acc + R * Dp;
  float* vb = kb + W * Dp;
  float* col = vb + VT * Dp;
  float* tail = col + L;

  // 1. queries: rotated at their slots, scaled, zero-padded to Dp
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = first + r % n;
    float* qr = qs + r * Dp;
    if (rope)
      load_rot<Ld>(q + r * D, a.cos + t * D, a.sin + t * D, qr, hd);
    else
      load_row<Ld>(q + r * D, qr, D);
    scale_row(qr, a.scale, D);
    fill(qr + D, 0.f, Dp - D);
  }

  // 2. logits of every row against every slot j < L (the causal mask is applied in 3.)
  const bool k_in_place = kF32 && !rope && Dp == D;
  for (int64_t j0 = 0; j0 < L; j0 += W) {
    const int64_t nj = L - j0 < W ? L - j0 : W;
    const float* kt;
    if (k_in_place && nj == W) {
      kt = reinterpret_cast<const float*>(k + j0 * D);
    } else {
      for (int64_t u = 0; u < nj; ++u) {
        const int64_t j = j0 + u;
        if (rope)
          load_rot<Ld>(k + j * D, a.cos + j * D, a.sin + j * D, kb + u * Dp, hd);
        else
          load_row<Ld>(k + j * D, kb + u * Dp, D);
        fill(kb + u * Dp + D, 0.f, Dp - D);
      }
      fill(kb + nj * Dp, 0.f, (W - nj) * Dp);
      kt = kb;
    }
    for (int64_t r = 0; r < R; ++r) {
      const vf z = tile_dots(qs + r * Dp, kt, Dp);
      if (nj == W) {
        storeu(logits + r * L + j0, z);
      } else {
        storeu(tail, z);
        for (int64_t u = 0; u < nj; ++u) logits[r * L + j0 + u] = tail[u];
      }
    }
  }

  // 3. softmax of each row over the slots it sees; the rest of the row is zeroed
  for (int64_t r = 0; r < R; ++r) {
    const int64_t len = first + r % n + 1;
    float* p = logits + r * L;
    const float m = row_max(p, len);
    const float sum = exp_sum(p, m, len);
    scale_row(p, 1.f / sum, len);
    fill(p + len, 0.f, L - len);
  }

  // 4. out = p v
  fill(acc, 0.f, R * Dp);
  const bool v_in_place = kF32 && Dp == D;
  for (int64_t j0 = 0; j0 < L; j0 += VT) {
    const int64_t nj = L - j0 < VT ? L - j0 : VT;
    const float* vt;
    if (v_in_place) {
      vt = reinterpret_cast<const float*>(v + j0 * D);
    } else {
      for (int64_t u = 0; u < nj; ++u) {
        load_row<Ld>(v + (j0 + u) * D, vb + u * Dp, D);
        fill(vb + u * Dp + D, 0.f, Dp - D);
      }
      vt = vb;
    }
    pv_tile(acc, logits + j0, L, vt, nj, Dp, R);
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = acc[r * Dp + d];

  // 5. scores of the window rows (the last w queries of each head of the group)
  if (a.scores == nullptr || a.w == 0) return;
  const int64_t w = a.w;
  fill(col, 0.f, L);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = n - w; i < n; ++i) add_row(col, logits + (g * n + i) * L, first + i + 1);
  float* sc = a.scores + (b * a.Hkv + h) * C;
  const float inv_g = 1.f / static_cast<float>(G);
  const int64_t body = L - w + 1;  // slots j <= L - w are seen by all w window queries
  if (a.bias == 0.0) {
    score_update(sc, col, L, a.decay, inv_g, 0.f, 0);
  } else if (a.bias_mode == BiasMode::kAbsolute) {
    // bias * j per window query that sees j: w of them up to L - w, L - j above
    score_update(sc, col, body, a.decay, inv_g, static_cast<float>(a.bias * static_cast<double>(w)), 0);
    for (int64_t j = body; j < L; ++j)
      sc[j] = sc[j] * a.decay +
              (col[j] * inv_g + static_cast<float>(a.bias * static_cast<double>(j) * static_cast<double>(L - j)));
  } else {
    // bias * (j + 1) / (t_i + 1)^2 summed over the window queries with t_i >= j
    double total = 0.0;
    for (int64_t i = 0; i < w; ++i) total += 1.0 / static_cast<double>((L - w + i + 1) * (L - w + i + 1));
    const float bt = static_cast<float>(a.bias * total);
    for (int64_t j = 0; j < body; ++j) sc[j] = sc[j] * a.decay + (col[j] * inv_g + bt * static_cast<float>(j + 1));
    for (int64_t j = body; j < L; ++j) {
      double suffix = 0.0;  // the window queries at slots t >= j (at most w terms)
      for (int64_t t = L - 1; t >= j; --t) suffix += 1.0 / static_cast<double>((t + 1) * (t + 1));
      sc[j] = sc[j] * a.decay + (col[j] * inv_g + static_cast<float>(a.bias * static_cast<double>(j + 1) * suffix));
    }
  }
}

}  // namespace

Kernel kernel_for(DType dtype) {
  switch (dtype) {
    case DType::kFloat:
      return {&scratch_floats, &decode_bh<LoadF32>, W};
    case DType::kBFloat16:
      return {&scratch_floats, &decode_bh<LoadBF16>, W};
    case DType::kHalf:
      return {&scratch_floats, &decode_bh<LoadF16>, W};
  }
  return {nullptr, nullptr, W};
}

}  // namespace INF_MLLM_ISA
}  // namespace decode
}  // namespace inf_mllm
