// Host API of the CUDA attention-core, mHC, compressor and indexer kernels (kernels/attn_sparse.cu,
// kernels/attn_mhc.cu, kernels/attn_compress.cu).
// Plain device pointers, sizes and a cudaStream_t (passed as void*): no model types, so dsv4_runtime stays
// independent of dsv4_model. All tensors are contiguous row-major FP32 on the device of the stream; all launches
// are asynchronous on `stream`. Implemented only in CUDA builds.
//
// ---- Sparse attention with an attention sink (CPU reference: src/model/sparse_attention.h) -------------------
// Candidates: ONE CSR list over a combined row space of R = n_raw + n_comp rows of width C:
//   cand_offsets [T + 1] (int32), cand_ids [cand_offsets[T]] (int32);
//   id <  n_raw : raw key row kv[id]            (the sliding window: SWA / the window part of CSA and HCA)
//   id >= n_raw : compressed row ckv[id - n_raw] (HCA: every visible compressed entry; CSA: the top-k entries)
// Any mix per query is allowed (window only, compressed only, both, or empty: only the sink). The order within a
// query's list is the softmax's summation order; build_sparse_candidates() puts the window first, then the
// compressed ids, as the CPU reference gathers them. K = V (MQA): each row is key and value for all H heads.
// Backward additionally takes the key-major transpose of the list (build_key_major()): for every row r,
// key_offsets [R + 1] and key_queries (int32 query ids, ascending): the queries that attend to r; the tensor-core
// backward takes key_positions instead (build_key_major_positions(): the CSR positions that list r, ascending).
#pragma once

#include <cstdint>
#include <vector>

namespace dsv4::cuda {

// ---- host helpers (no GPU needed) ----------------------------------------------------------------------------
// From the CPU index layout (window [win_begin, win_end) + compressed CSR) to the combined CSR (window first).
void build_sparse_candidates(const std::vector<int64_t>& win_begin, const std::vector<int64_t>& win_end,
                             const std::vector<int64_t>& comp_offsets, const std::vector<int64_t>& comp_ids,
                             int64_t n_raw, std::vector<int32_t>& cand_offsets, std::vector<int32_t>& cand_ids);
// Key-major transpose of a candidate CSR over `n_rows` rows: per row, the attending queries in ascending order
// (a query listing a row twice appears twice). Deterministic (counting sort).
void build_key_major(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids, int64_t n_rows,
                     std::vector<int32_t>& key_offsets, std::vector<int32_t>& key_queries);
// The same transpose carrying each entry's CSR position c (cand_ids[c] == r) instead of its query: per row, the
// positions in ascending order (= ascending query order). Used by the tensor-core backward, whose per-candidate
// partial dK rows are indexed by position.
void build_key_major_positions(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids,
                               int64_t n_rows, std::vector<int32_t>& key_offsets, std::vector<int32_t>& key_positions);

// ---- the same builders on the device (kernels/attn_index.cu; CUDA builds only), bit for bit the host ones --------
// For compressed ids already on the device (CSA's top-k). win_begin [T], cand_offsets [T + 1] (the host computes them:
// window length + compressed count per query), comp_offsets [T + 1], comp_ids [comp_offsets[T]]: device int32.
// cand_ids [cand_offsets[T]] is overwritten: the window ids, then n_raw + the compressed ids, per query.
void build_sparse_candidates_device(const int32_t* win_begin, const int32_t* cand_offsets,
                                    const int32_t* comp_offsets, const int32_t* comp_ids, int64_t T, int64_t n_raw,
                                    int32_t* cand_ids, void* stream);
// key_offsets [n_rows + 1] and key_positions [nnz] of build_key_major_positions() from device cand_ids [nnz] (a stable
// radix sort of the row ids carrying the positions); workspace: key_major_positions_device_workspace() bytes.
size_t key_major_positions_device_workspace(int64_t nnz, int64_t n_rows);
void build_key_major_positions_device(const int32_t* cand_ids, int64_t nnz, int64_t n_rows, int32_t* key_offsets,
                                      int32_t* key_positions, void* workspace, size_t workspace_bytes, void* stream);

// ---- sparse attention -------------------------------------------------------------------------------------
// q [T, H, C]; kv [n_raw, C]; ckv [n_comp, C] (may be null when n_comp == 0); sink [H].
// o [T, H, C] and lse [T, H] are overwritten: lse = log(exp(sink) + sum_j exp(z_j)), z_j = scale q.k_j.
void sparse_attn_forward(const float* q, const float* kv, const float* ckv, const float* sink,
                         const int32_t* cand_offsets, const int32_t* cand_ids, int64_t T, int64_t n_raw,
                         int64_t n_comp, int64_t H, int64_t C, float scale, float* o, float* lse, void* stream);

// BF16 tensor-core forward (kernels/attn_sparse_tc.cu): the same candidates, arguments and outputs as
// sparse_attn_forward, with q * scale, the K = V rows and the probabilities rounded to BF16 for mma.sync (FP32
// accumulation and softmax). Needs C == 512, H a multiple of 16 (sparse_attn_tc_supported) and 16-byte aligned
// kv / ckv / o.
bool sparse_attn_tc_supported(int64_t H, int64_t C);
void sparse_attn_forward_tc(const float* q, const float* kv, const float* ckv, const float* sink,
                            const int32_t* cand_offsets, const int32_t* cand_ids, int64_t T, int64_t n_raw,
                            int64_t n_comp, int64_t H, int64_t C, float scale, float* o, float* lse, void* stream);

// Workspace floats of sparse_attn_backward: D = rowsum(do * o) per (query, head).
inline int64_t sparse_attn_backward_workspace(int64_t T, int64_t H) { return T * H; }

// dq [T, H, C] is overwritten; dkv [n_raw, C], dckv [n_comp, C] and dsink [H] accumulate (+=), like the CPU
// reference. Deterministic: no atomics; every output element is summed by one thread in a fixed order.
// key_offsets [n_raw + n_comp + 1], key_queries: build_key_major() of the same candidates.
void sparse_attn_backward(const float* q, const float* kv, const float* ckv, const float* sink, const float* o,
                          const float* lse, const float* dout, const int32_t* cand_offsets, const int32_t* cand_ids,
                          const int32_t* key_offsets, const int32_t* key_queries, int64_t T, int64_t n_raw,
                          int64_t n_comp, int64_t H, int64_t C, float scale, float* dq, float* dkv, float* dckv,
                          float* dsink, float* workspace, void* stream);

// BF16 tensor-core backward (kernels/attn_sparse_tc.cu): the same semantics as sparse_attn_backward (dq overwritten;
// dkv, dckv, dsink accumulate; deterministic, no atomics) with q * scale, the K = V rows, dout, P and dS rounded to
// BF16 for mma.sync (FP32 accumulation, softmax and D). Needs sparse_attn_tc_supported(H, C) and 16-byte aligned
// kv / ckv / dq / dkv / dckv / workspace. Instead of key_queries it takes build_key_major_positions() of the
// candidates (key_offsets, key_positions) and the candidate count n_candidates = cand_offsets[T].
// Per (query, candidate, 16-head group) the query-major kernel writes the candidate's dK row to a partial buffer;
// the candidate positions are processed in chunks of sparse_attn_backward_tc_chunk() positions (the buffer holds
// one chunk: about kSparseAttnTcPartialFloats floats), each chunk reduced key-major into dkv / dckv before the next.
// The results do not depend on the chunk size (bit for bit); `chunk` > 0 overrides it (tests exercise the chunking
// with small chunks; the workspace must then be sparse_attn_backward_tc_workspace(..., chunk)).
inline constexpr int64_t kSparseAttnTcPartialFloats = int64_t{1} << 26;  // 256 MB of partial dK rows per chunk
inline int64_t sparse_attn_backward_tc_chunk(int64_t H, int64_t C, int64_t n_candidates) {
  const int64_t per_position = (H / 16) * C;
  const int64_t fit = kSparseAttnTcPartialFloats / (per_position > 0 ? per_position : 1);
  return n_candidates < fit ? (n_candidates > 0 ? n_candidates : 1) : (fit > 0 ? fit : 1);
}
// Workspace floats of sparse_attn_backward_tc: D [T, H] (rounded up to 4 floats), then the partial dK rows
// [H / 16, chunk, C]. chunk: positions per chunk, 0 = sparse_attn_backward_tc_chunk(H, C, n_candidates).
inline int64_t sparse_attn_backward_tc_workspace(int64_t T, int64_t H, int64_t C, int64_t n_candidates,
                                                 int64_t chunk = 0) {
  return (T * H + 3) / 4 * 4 + (H / 16) * (chunk > 0 ? chunk : sparse_attn_backward_tc_chunk(H, C, n_candidates)) * C;
}
void sparse_attn_backward_tc(const float* q, const float* kv, const float* ckv, const float* sink, const float* o,
                             const float* lse, const float* dout, const int32_t* cand_offsets, const int32_t* cand_ids,
                             const int32_t* key_offsets, const int32_t* key_positions, int64_t T, int64_t n_raw,
                             int64_t n_comp, int64_t n_candidates, int64_t H, int64_t C, float scale, float* dq,
                             float* dkv, float* dckv, float* dsink, float* workspace, void* stream,
                             int64_t chunk = 0);

// ---- mHC (CPU reference: src/model/mhc.h) ---------------------------------------------------------------------
// n streams (1 <= n <= kMhcMaxN), D = dim, M = (2 + n) n mixes, N = n D. fn [M, N], scale [3], base [M].
inline constexpr int kMhcMaxN = 8;
struct MhcShape {
  int64_t T = 0;       // tokens
  int64_t n = 4;       // hc_mult
  int64_t D = 0;       // dim
  int64_t iters = 20;  // Sinkhorn iterations (>= 1)
  double hc_eps = 1e-6;
  double norm_eps = 1e-6;
  int64_t M() const { return (2 + n) * n; }
  int64_t N() const { return n * D; }
};

// X [T, n, D] -> x [T, D], post [T, n], comb [T, n, n] (row-major [j, k]); saved mixes [T, M], rstd [T].
// The mixing / gradient GEMMs of the pre and head functions run through cuBLAS on `stream` (made the device's
// current stream for the call).
void mhc_pre_forward(const float* X, const float* fn, const float* scale, const float* base, float* x, float* post,
                     float* comb, float* mixes, float* rstd, const MhcShape& s, void* stream);

// Workspace floats of mhc_pre_backward: dz [T, M] (pre-activation gradients), dm [T, M] (dmixes * rstd), c [T],
// then M doubles (8-byte aligned when the workspace is) for the dscale partial sums.
inline int64_t mhc_pre_backward_workspace(const MhcShape& s) { return 2 * s.T * s.M() + s.T + 1 + 2 * s.M(); }

// Backward of mhc_pre_forward given dx [T, D], dpost [T, n], dcomb [T, n, n] (dpost / dcomb may be null = zero).
// dX [T, n, D] is overwritten (added to when accumulate). dfn [M, N], dscale [3], dbase [M] accumulate (+=) when
// non-null. Sinkhorn is recomputed from the saved mixes. Deterministic (reductions over T in a fixed order).
void mhc_pre_backward(const float* dx, const float* dpost, const float* dcomb, const float* X, const float* fn,
                      const float* scale, const float* base, const float* mixes, const float* rstd, float* dX,
                      float* dfn, float* dscale, float* dbase, bool accumulate, float* workspace, const MhcShape& s,
                      void* stream);

// HyperHead (final collapse): fn [n, N], scale [1], base [n]; h [T, D] = sum_j (sigmoid(mix_j scale + base_j) +
// hc_eps) X[j]; saved mixes [T, n], rstd [T]. s.iters is unused.
void mhc_head_forward(const float* X, const float* fn, const float* scale, const float* base, float* h,
                      float* mixes, float* rstd, const MhcShape& s, void* stream);
inline int64_t mhc_head_backward_workspace(const MhcShape& s) { return 2 * s.T * s.n + s.T + 1 + 2 * s.n; }
// dX overwritten (added to when accumulate); dfn [n, N], dscale [1], dbase [n] accumulate when non-null.
void mhc_head_backward(const float* dh, const float* X, const float* fn, const float* scale, const float* base,
                       const float* mixes, const float* rstd, float* dX, float* dfn, float* dscale, float* dbase,
                       bool accumulate, float* workspace, const MhcShape& s, void* stream);

// Xnew [T, n, D]: Xnew[k] = post[k] F + sum_j comb[j, k] X[j].
void mhc_post_forward(const float* F, const float* X, const float* post, const float* comb, float* Xnew,
                      const MhcShape& s, void* stream);
// dF [T, D], dX [T, n, D], dpost [T, n], dcomb [T, n, n], all overwritten.
void mhc_post_backward(const float* dXnew, const float* F, const float* X, const float* post, const float* comb,
                       float* dF, float* dX, float* dpost, float* dcomb, const MhcShape& s, void* stream);

// ---- KV compressor pooling (CPU reference: compress_pool_forward / compress_pool_backward of
//      src/model/compressor.h; shared per-channel cores: src/runtime/compress_math.h) -------------------------------
// The part of Compressor::forward between the projections (kv = wkv(x), gate = wgate(x), GEMMs outside) and the
// RMSNorm / RoPE / fake quant (separate ops). m = ratio, overlap = (m == 4), W = 2C when overlap else C.
// kv, gate [T, W]; ape [m, W]; entry_token [E] (int64: the first token of entry e's block, CompressPlan order) and
// entry_has_prev [E] (uint8: the document has a block before it); documents never share a block (the plan's job).
// out [E, C] is overwritten. One thread per (entry, channel), the reference's operation order per channel.
void compress_pool_forward(const float* kv, const float* gate, const float* ape, const int64_t* entry_token,
                           const uint8_t* entry_has_prev, int64_t E, int64_t m, int64_t C, bool overlap, float* out,
                           void* stream);

// Workspace floats of compress_pool_backward: per-entry ape gradients [E, m, W] and their chunk partial sums.
inline constexpr int64_t kCompressApeChunk = 32;  // entries per partial sum of dape
inline int64_t compress_pool_backward_workspace(int64_t E, int64_t m, int64_t C, bool overlap) {
  const int64_t mW = m * (overlap ? 2 * C : C);
  return E * mW + (E + kCompressApeChunk - 1) / kCompressApeChunk * mW;
}
// dout [E, C]. dkv, dgate [T, W] accumulate (+=) at the entries' slots (each element belongs to at most one
// (entry, slot), so one thread adds to it); rows of a trailing partial block are untouched. dape [m, W] accumulates
// the sum over entries, deterministically: per-entry terms in the workspace, summed in chunks of kCompressApeChunk
// entries (ascending), then the chunks in order. No atomics.
void compress_pool_backward(const float* kv, const float* gate, const float* ape, const int64_t* entry_token,
                            const uint8_t* entry_has_prev, int64_t E, int64_t m, int64_t C, bool overlap,
                            const float* dout, float* dkv, float* dgate, float* dape, float* workspace, void* stream);

// ---- lightning indexer (CPU reference: indexer_scores_rows, Indexer::scores and Indexer::select_topk of
//      src/model/indexer.h) -------------------------------------------------------------------------------------
// The part of Indexer::scores after the projections / RoPE / rotation: q [T, nI, cI], k [E, cI] (compressed
// index keys), w [T, nI] (weights_proj output, unscaled). Per query t the visible entries are
// first_entry[t] + 0 .. n_visible[t] - 1 with n_visible[t] = score_offsets[t + 1] - score_offsets[t] (int64 CSR,
// CompressPlan's first_entry / n_visible). scores[score_offsets[t] + e] (overwritten) =
//   sum_h ((max(q[t,h] . k[first_entry[t] + e], 0) * score_scale) * (w[t,h] * weight_scale)), h ascending,
// then rounded to BF16 when round_bf16 (simulate_release_quant without tp; under tp round after the tp sum).
// max_visible >= every n_visible[t] (sizes the grid).
void indexer_scores(const float* q, const float* k, const float* w, const int64_t* first_entry,
                    const int64_t* score_offsets, int64_t T, int64_t E, int64_t nI, int64_t cI, int64_t max_visible,
                    float score_scale, float weight_scale, bool round_bf16, float* scores, void* stream);

// Host helper (no GPU): CSR offsets [T + 1] of the top-k lists, min(topk, n_visible[t]) per query.
void indexer_topk_offsets(const std::vector<int64_t>& n_visible, int64_t topk, std::vector<int64_t>& topk_offsets);

// Causal top-k per query, exactly Indexer::select_topk: the min(topk, n_visible) highest scores (ties to the lower
// entry id), written as global entry ids (first_entry[t] + e, int32) in ascending order to
// ids[topk_offsets[t] .. topk_offsets[t + 1]). Exact (radix select on the float bits, no arithmetic); scores must
// not be NaN (the reference's order is undefined there); -0 equals +0 as in the reference.
void indexer_topk(const float* scores, const int64_t* score_offsets, const int64_t* first_entry,
                  const int64_t* topk_offsets, int64_t T, int64_t E, int32_t* ids, void* stream);

}  // namespace dsv4::cuda
