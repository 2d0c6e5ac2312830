// Core attention with an attention sink over explicit per-query candidate lists (DeepSeek-V4 `sparse_attn`).
//
// Legend: Tq queries (tokens), H heads, C head_dim, Tk raw keys, E compressed entries.
//   q_TqHC [Tq, H, C] queries; kv_TkC [Tk, C] raw (windowed) keys; ckv_EC [E, C] compressed entries;
//   K = V: each candidate row serves as key and value. sink_H [H] per-head sink logits.
// Candidates of query t: the raw keys [win_begin[t], win_end[t]) and the compressed entries
// comp_ids[comp_offsets[t] .. comp_offsets[t+1]). For head h:
//   z_j = scale * (q_th . k_j)
//   lse_th = log(exp(sink_h) + sum_j exp(z_j))            (max-subtracted)
//   o_th = sum_j exp(z_j - lse_th) k_j
// Forward saves lse [Tq, H]; backward recomputes the probabilities p_j = exp(z_j - lse):
//   D_h = do_th . o_th ;  dz_j = p_j (do_th . k_j - D_h)
//   dq_th = scale sum_j dz_j k_j ; dk_j += scale dz_j q_th + p_j do_th ; dsink_h -= exp(sink_h - lse_th) D_h
// One query at a time with all its heads (keys loaded once for all heads): the shape the CUDA kernel takes.
// Templates so tests can run them in double precision; the module instantiates float.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "runtime/error.h"
#include "runtime/tensor.h"

namespace dsv4 {

struct SparseAttnIndex {
  std::vector<int64_t> win_begin;     // [Tq] first raw key of the window
  std::vector<int64_t> win_end;       // [Tq] one past the last raw key
  std::vector<int64_t> comp_offsets;  // [Tq + 1] CSR offsets into comp_ids
  std::vector<int64_t> comp_ids;      // compressed entry ids (ascending per query)
  // CSA on a device whose lists are built there (SparseAttnDeviceIndex::build from AttentionCtx::comp_ids_device):
  // the ids stay on the device and comp_ids is empty (validate() then checks the windows and offsets only; the ids
  // come from the indexer's top-k kernel over each query's visible entries).
  bool comp_ids_on_device = false;

  int64_t queries() const { return static_cast<int64_t>(win_begin.size()); }
  int64_t candidates(int64_t t) const {
    const auto i = static_cast<size_t>(t);
    return (win_end[i] - win_begin[i]) + (comp_offsets[i + 1] - comp_offsets[i]);
  }
  // Checks sizes and that every index lies in [0, n_raw) / [0, n_comp).
  void validate(int64_t n_raw, int64_t n_comp) const;
};

namespace detail {
// Pointers to the candidate rows of query t: the window, then the compressed entries.
template <typename P>
void gather_candidates(const SparseAttnIndex& idx, int64_t t, P* kv, P* ckv, int64_t dim, std::vector<P*>& rows) {
  rows.clear();
  const auto i = static_cast<size_t>(t);
  for (int64_t j = idx.win_begin[i]; j < idx.win_end[i]; ++j) rows.push_back(kv + j * dim);
  for (int64_t c = idx.comp_offsets[i]; c < idx.comp_offsets[i + 1]; ++c)
    rows.push_back(ckv + idx.comp_ids[static_cast<size_t>(c)] * dim);
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
}  // namespace detail

// o_TqHC (overwritten) and lse_TqH (overwritten).
template <typename T>
void sparse_attn_forward(const SparseAttnIndex& idx, const T* q, const T* kv, const T* ckv, const T* sink, int64_t H,
                         int64_t C, T scale, T* o, T* lse) {
  std::vector<const T*> rows;
  std::vector<T> z;
  for (int64_t t = 0; t < idx.queries(); ++t) {
    detail::gather_candidates(idx, t, kv, ckv, C, rows);
    const int64_t n = static_cast<int64_t>(rows.size());
    z.assign(static_cast<size_t>(H * n), T(0));
    const T* qt = q + t * H * C;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t h = 0; h < H; ++h) z[static_cast<size_t>(h * n + j)] = detail::dot(qt + h * C, rows[j], C) * scale;
    T* ot = o + t * H * C;
    std::fill(ot, ot + H * C, T(0));
    for (int64_t h = 0; h < H; ++h) {
      T* zh = z.data() + h * n;
      T m = sink[h];
      for (int64_t j = 0; j < n; ++j) m = std::max(m, zh[j]);
      T sum = std::exp(sink[h] - m);
      for (int64_t j = 0; j < n; ++j) {
        zh[j] = std::exp(zh[j] - m);
        sum += zh[j];
      }
      lse[t * H + h] = m + std::log(sum);
      const T inv = T(1) / sum;
      T* oh = ot + h * C;
      for (int64_t j = 0; j < n; ++j) {
        const T p = zh[j] * inv;
        const T* k = rows[j];
        for (int64_t d = 0; d < C; ++d) oh[d] += p * k[d];
      }
    }
  }
}

// dq_TqHC is overwritten; dkv_TkC, dckv_EC and dsink_H accumulate (+=). o and lse are the forward's.
template <typename T>
void sparse_attn_backward(const SparseAttnIndex& idx, const T* q, const T* kv, const T* ckv, const T* sink, const T* o,
                          const T* lse, const T* dout, int64_t H, int64_t C, T scale, T* dq, T* dkv, T* dckv,
                          T* dsink) {
  std::vector<const T*> rows;
  std::vector<T*> drows;
  std::vector<T> D(static_cast<size_t>(H));
  for (int64_t t = 0; t < idx.queries(); ++t) {
    detail::gather_candidates(idx, t, kv, ckv, C, rows);
    detail::gather_candidates(idx, t, dkv, dckv, C, drows);
    const int64_t n = static_cast<int64_t>(rows.size());
    const T* qt = q + t * H * C;
    const T* do_t = dout + t * H * C;
    T* dqt = dq + t * H * C;
    std::fill(dqt, dqt + H * C, T(0));
    for (int64_t h = 0; h < H; ++h) {
      D[static_cast<size_t>(h)] = detail::dot(do_t + h * C, o + (t * H + h) * C, C);
      dsink[h] -= std::exp(sink[h] - lse[t * H + h]) * D[static_cast<size_t>(h)];
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* k = rows[j];
      T* dk = drows[j];
      for (int64_t h = 0; h < H; ++h) {
        const T* qh = qt + h * C;
        const T* doh = do_t + h * C;
        const T p = std::exp(detail::dot(qh, k, C) * scale - lse[t * H + h]);
        const T dz = p * (detail::dot(doh, k, C) - D[static_cast<size_t>(h)]);
        const T a = scale * dz;
        T* dqh = dqt + h * C;
        for (int64_t d = 0; d < C; ++d) {
          dqh[d] += a * k[d];
          dk[d] += a * qh[d] + p * doh[d];
        }
      }
    }
  }
}

// ---- tensor-op path (model/exec_path.h): the same core on F32 tensors of one device --------------------------------
// CPU tensors run the templates above (the CPU twins); CUDA tensors the kernels of kernels/attention_kernels.h, which
// take the candidates as one combined CSR over [raw keys; compressed entries] (window first, as gather_candidates),
// plus its key-major transpose for the backward: built on the host from the SparseAttnIndex and copied to the device.
// Shared by the attention modules' tensor-op paths (sparse attention, compressor, indexer): the stream the kernels of
// kernels/attention_kernels.h run on for tensors on t's CUDA device (its current stream; the tensor copies use the
// same one), and the error of a build without CUDA given CUDA tensors (`what` names the caller).
void* attention_kernel_stream(const Tensor& t);
[[noreturn]] void fail_without_cuda(const char* what);

// The key-major transpose a backward needs: the FP32 kernel takes the attending queries per row, the tensor-core
// kernel the CSR positions per row (kernels/attention_kernels.h).
enum class SparseAttnKeyMajor { none, queries, positions };

struct SparseAttnDeviceIndex {
  Tensor cand_offsets, cand_ids;    // I32 [T + 1], [nnz] (CUDA only; undefined for CPU tensors)
  Tensor key_offsets;               // I32 [n_raw + n_comp + 1] (CUDA, when built with a key-major transpose)
  Tensor key_queries;               // I32 [nnz] (CUDA, SparseAttnKeyMajor::queries)
  Tensor key_positions;             // I32 [nnz] (CUDA, SparseAttnKeyMajor::positions)
  int64_t n_candidates = 0;         // nnz
  // Undefined tensors for `device` = CPU; key_major: the transpose the backward needs (none for a forward only).
  // comp_ids_device (optional): idx.comp_ids already on `device` (I32, CSR order of idx.comp_offsets; CSA's top-k):
  // the lists are then built there (cuda::build_sparse_candidates_device and, for positions, the device key-major
  // sort), bit for bit the host build, without the host pass and the upload of nnz-sized arrays.
  static SparseAttnDeviceIndex build(const SparseAttnIndex& idx, int64_t n_raw, int64_t n_comp, Device device,
                                     SparseAttnKeyMajor key_major, const Tensor& comp_ids_device = Tensor());
};

// Whether tensor_cores = true selects the BF16 tensor-core kernels for H heads of dim C on CUDA tensors
// (cuda::sparse_attn_tc_supported); false in a build without CUDA.
bool sparse_attn_tensor_cores_taken(bool tensor_cores, int64_t H, int64_t C);

struct SparseAttnOut {
  Tensor o;    // [T, H, C]
  Tensor lse;  // [T, H]
};
// q [T, H, C], kv [n_raw, C], ckv [n_comp, C] (undefined when n_comp = 0), sink [H]: contiguous F32 on one device.
// tensor_cores: on CUDA, the BF16 tensor-core forward (cuda::sparse_attn_forward_tc) where it supports H and C; the
// FP32 kernel otherwise. Ignored on the CPU.
SparseAttnOut sparse_attn_forward_tensors(const SparseAttnIndex& idx, const SparseAttnDeviceIndex& didx,
                                          const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& sink,
                                          float scale, bool tensor_cores);
struct SparseAttnGrads {
  Tensor dq;     // [T, H, C]
  Tensor dkv;    // [n_raw, C]
  Tensor dckv;   // [n_comp, C] (undefined when n_comp = 0)
  Tensor dsink;  // [H], summed from zero (the caller adds it to the parameter's gradient)
};
// tensor_cores: on CUDA, the BF16 tensor-core backward (cuda::sparse_attn_backward_tc; didx built with
// SparseAttnKeyMajor::positions) where it supports H and C; the FP32 kernel otherwise (SparseAttnKeyMajor::queries).
// Ignored on the CPU.
SparseAttnGrads sparse_attn_backward_tensors(const SparseAttnIndex& idx, const SparseAttnDeviceIndex& didx,
                                             const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& sink,
                                             const Tensor& o, const Tensor& lse, const Tensor& dout, float scale,
                                             bool tensor_cores);

}  // namespace dsv4
