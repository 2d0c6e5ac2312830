// Raw-pointer cores of the KV compressor's pooling and of the lightning indexer's score, shared by the model
// (src/model/compressor.cpp, src/model/indexer.cpp) and the CUDA kernels (kernels/attn_compress.cu). DSV4_HD: the
// same code runs on the host and, one channel per thread, on the device. Templates so tests can run them in double.
//
// Compressor pooling (legend of model/compressor.h): entry e pools, per channel c, the S slots of its block(s):
//   m > 4  (no overlap): S = m slots, slot s = token s0 + s, channels [0, C) of the [T, W = C] projections.
//   m == 4 (overlap):    S = 2m slots, slot s < m = previous block's token s0 - m + s, channels [0, C) (masked when
//                        the entry is its document's first), slot s >= m = this block's token s0 + s - m,
//                        channels [C, 2C) of the [T, W = 2C] projections.
//   z_s = gate[slot] + ape[slot's row, col];  w_s = exp(z_s - max_s z) / sum_s exp(z_s - max_s z)  (live slots)
//   out[c] = sum_s w_s kv[slot]
// The entry functions handle a channel range [c0, c1) with caller-provided per-channel scratch (indexed c - c0):
// the CPU passes the whole row (vectorisable inner channel loops), a CUDA thread one channel. The softmax weights
// are recomputed instead of stored (the same float operations, so the same values).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "runtime/dtype.h"  // DSV4_HD

namespace dsv4 {

// Slot s of an entry whose block starts at token s0: source row and channel offset into the [T, W] projections,
// the ape row, and whether the slot exists (the overlapping previous block of a document's first entry does not).
struct CompressSlot {
  int64_t row, col, ape_row;
  bool live;
};
DSV4_HD CompressSlot compress_slot(int64_t s, int64_t s0, bool has_prev, int64_t m, int64_t C, bool overlap) {
  if (!overlap) return {s0 + s, 0, s, true};
  if (s < m) return {s0 - m + s, 0, s, has_prev};  // previous block, first half of the channels
  return {s0 + (s - m), C, s - m, true};           // this block, second half
}

DSV4_HD int64_t compress_slots(int64_t m, bool overlap) { return overlap ? 2 * m : m; }
DSV4_HD int64_t compress_width(int64_t C, bool overlap) { return overlap ? 2 * C : C; }

// Per-channel softmax max and denominator of one entry: mx[c - c0], sum[c - c0].
template <typename T>
DSV4_HD void compress_pool_stats(const T* gate, const T* ape, int64_t s0, bool has_prev, int64_t m, int64_t C,
                                 bool overlap, int64_t c0, int64_t c1, T* mx, T* sum) {
  const int64_t W = compress_width(C, overlap), S = compress_slots(m, overlap);
  for (int64_t c = c0; c < c1; ++c) {
    mx[c - c0] = -std::numeric_limits<T>::infinity();
    sum[c - c0] = T(0);
  }
  for (int64_t s = 0; s < S; ++s) {
    const CompressSlot sl = compress_slot(s, s0, has_prev, m, C, overlap);
    if (!sl.live) continue;
    const T* g = gate + sl.row * W + sl.col;
    const T* a = ape + sl.ape_row * W + sl.col;
    for (int64_t c = c0; c < c1; ++c) {
      const T z = g[c] + a[c];
      mx[c - c0] = mx[c - c0] < z ? z : mx[c - c0];  // std::max
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    const CompressSlot sl = compress_slot(s, s0, has_prev, m, C, overlap);
    if (!sl.live) continue;
    const T* g = gate + sl.row * W + sl.col;
    const T* a = ape + sl.ape_row * W + sl.col;
    for (int64_t c = c0; c < c1; ++c) sum[c - c0] += std::exp((g[c] + a[c]) - mx[c - c0]);
  }
}

// Softmax weight of a live slot (row pointers g, a already offset to the slot's row and column).
template <typename T>
DSV4_HD T compress_pool_weight(const T* g, const T* a, int64_t c, T mx, T sum) {
  return std::exp((g[c] + a[c]) - mx) / sum;
}

// out[c] for c in [c0, c1) (overwritten; out is the entry's row of C). mx, sum: scratch of c1 - c0.
template <typename T>
DSV4_HD void compress_pool_entry_forward(const T* kv, const T* gate, const T* ape, int64_t s0, bool has_prev, int64_t m,
                                         int64_t C, bool overlap, int64_t c0, int64_t c1, T* mx, T* sum, T* out) {
  const int64_t W = compress_width(C, overlap), S = compress_slots(m, overlap);
  compress_pool_stats(gate, ape, s0, has_prev, m, C, overlap, c0, c1, mx, sum);
  for (int64_t c = c0; c < c1; ++c) out[c] = T(0);
  for (int64_t s = 0; s < S; ++s) {
    const CompressSlot sl = compress_slot(s, s0, has_prev, m, C, overlap);
    if (!sl.live) continue;
    const int64_t off = sl.row * W + sl.col;
    const T* a = ape + sl.ape_row * W + sl.col;
    for (int64_t c = c0; c < c1; ++c)
      out[c] += kv[off + c] * compress_pool_weight(gate + off, a, c, mx[c - c0], sum[c - c0]);
  }
}

// Backward of one entry for c in [c0, c1): dout is the entry's row of C; dkv, dgate [T, W] and dape [m, W]
// accumulate (+=) at the entry's live slots. mx, sum, ssum: scratch of c1 - c0.
//   dw_s = dout kv_s;  ssum = sum_s w_s dw_s;  dz_s = w_s (dw_s - ssum);  dkv_s += dout w_s;  dgate_s, dape_s += dz_s
template <typename T>
DSV4_HD void compress_pool_entry_backward(const T* kv, const T* gate, const T* ape, int64_t s0, bool has_prev,
                                          int64_t m, int64_t C, bool overlap, int64_t c0, int64_t c1, const T* dout,
                                          T* mx, T* sum, T* ssum, T* dkv, T* dgate, T* dape) {
  const int64_t W = compress_width(C, overlap), S = compress_slots(m, overlap);
  compress_pool_stats(gate, ape, s0, has_prev, m, C, overlap, c0, c1, mx, sum);
  for (int64_t c = c0; c < c1; ++c) ssum[c - c0] = T(0);
  for (int64_t s = 0; s < S; ++s) {
    const CompressSlot sl = compress_slot(s, s0, has_prev, m, C, overlap);
    if (!sl.live) continue;
    const int64_t off = sl.row * W + sl.col;
    const T* a = ape + sl.ape_row * W + sl.col;
    for (int64_t c = c0; c < c1; ++c) {
      const T w = compress_pool_weight(gate + off, a, c, mx[c - c0], sum[c - c0]);
      ssum[c - c0] += w * (dout[c] * kv[off + c]);
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    const CompressSlot sl = compress_slot(s, s0, has_prev, m, C, overlap);
    if (!sl.live) continue;
    const int64_t off = sl.row * W + sl.col;
    const int64_t aoff = sl.ape_row * W + sl.col;
    for (int64_t c = c0; c < c1; ++c) {
      const T w = compress_pool_weight(gate + off, ape + aoff, c, mx[c - c0], sum[c - c0]);
      const T dz = w * (dout[c] * kv[off + c] - ssum[c - c0]);
      dkv[off + c] += dout[c] * w;
      dgate[off + c] += dz;
      dape[aoff + c] += dz;
    }
  }
}

// ---- lightning indexer ---------------------------------------------------------------------------------------
// One head's term of I[t, e] = sum_h w[t, h] nI^-0.5 (ReLU(qI[t, h] . KI[e]) cI^-0.5): wt = w[t, h] * weight_scale,
// dot = qI[t, h] . KI[e]. The sum runs over h ascending from 0.
template <typename T>
DSV4_HD T indexer_score_term(T dot, T wt, T score_scale) {
  return ((dot < T(0) ? T(0) : dot) * score_scale) * wt;  // std::max(dot, 0) exactly (NaN and -0 pass)
}

}  // namespace dsv4
