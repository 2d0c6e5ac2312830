// KV compressor of DeepSeek-V4's CSA / HCA layers (`attn.compressor.*`) and of the lightning indexer
// (`attn.indexer.compressor.*`).
//
// Legend: T tokens, D model dim, C head dim of the entries (head_dim, or index_head_dim for the indexer),
// m compress ratio, W = coff * C with coff = 2 when m == 4 (overlapping windows) else 1, E entries.
//
//   kv_TW = wkv(x), gate_TW = wgate(x)
//   entry i of a document pools block i = document positions [i*m, (i+1)*m), per channel:
//     m > 4  : C_i = sum_{j<m} softmax_j(gate[j] + ape[j]) kv[j]                (m slots)
//     m == 4 : 2m slots: [prev block's kv[:, :C] / gate[:, :C] + ape[:, :C]  (masked for block 0),
//                         this block's kv[:, C:] / gate[:, C:] + ape[:, C:]]
//   C_i = norm(C_i); RoPE on the last rope dims at position i*m (document-relative, the block's first token)
//   Indexer compressor (rotate) with simulate_release_quant: Hadamard rotation, then FP4 fake-quant (block 32).
//   Main compressor with simulate_release_quant: FP8 fake-quant of the non-rope dims (block 64).
// A document's trailing partial block is not compressed. Documents are compressed separately (blocks are
// aligned to document starts and never cross one), as the CompressPlan lays out.
#pragma once

#include <vector>

#include "model/layers.h"
#include "model/rope.h"
#include "model/seq_layout.h"

namespace dsv4 {

// Where the compressed entries of a [T = batch * seq] activation come from and who may see them.
// Entries of one document are contiguous and in block order.
struct CompressPlan {
  int64_t ratio = 0;
  std::vector<int64_t> entry_token;     // [E] global token index of the first token of entry e's block
  std::vector<int64_t> entry_pos;       // [E] RoPE position of entry e: i * ratio within its document
  std::vector<uint8_t> entry_has_prev;  // [E] 1 if the previous block of the same document exists (i > 0)
  std::vector<int64_t> first_entry;     // [T] id of entry 0 of token t's document
  std::vector<int64_t> n_visible;       // [T] entries of t's document whose whole block is <= t: (pos + 1) / ratio

  static CompressPlan build(const SeqLayout& layout, int64_t ratio);
  int64_t entries() const { return static_cast<int64_t>(entry_token.size()); }
};

// ---- pooling core: per-channel softmax over the slots of each entry --------------------------------------
// kv, gate: [T, W] (row stride W); ape: [m, W]; out: [E, C] (overwritten).
template <typename T>
void compress_pool_forward(const T* kv, const T* gate, const T* ape, const int64_t* entry_token,
                           const uint8_t* entry_has_prev, int64_t n_entries, int64_t m, int64_t C, bool overlap,
                           T* out);
// dkv, dgate: [T, W] and dape: [m, W] accumulate (+=).
template <typename T>
void compress_pool_backward(const T* kv, const T* gate, const T* ape, const int64_t* entry_token,
                            const uint8_t* entry_has_prev, int64_t n_entries, int64_t m, int64_t C, bool overlap,
                            const T* dout, T* dkv, T* dgate, T* dape);

struct CompressorCtx {
  LinearCtx wkv, wgate;
  Tensor kv_TW, gate_TW;  // projections
  RMSNormCtx norm;
  // Tensor-op path (model/exec_path.h): set by a forward on that path; the plan's per-entry arrays on x's device.
  bool ops_path = false;
  Tensor entry_token, entry_has_prev, entry_pos;  // I64 [E], U8 [E], I64 [E]
};

// Checks of the tensor-op path (CUDA tensors, or CPU tensors under ForceOpsPath), one line naming `module` and what is
// missing: a Linear without an adapter, not frozen, its weight on `device`; a parameter's value on `device`.
void check_linear_for_ops(const std::string& module, const Linear& l, Device device);
void check_param_for_ops(const std::string& module, const Param& p, Device device);

class Compressor {
 public:
  Compressor() = default;
  // prefix: "layers.{i}.attn.compressor." or "layers.{i}.attn.indexer.compressor.".
  // rotate: the indexer's compressor (Hadamard + FP4 when simulating instead of FP8 on the non-rope dims).
  Compressor(const std::string& prefix, const ModelConfig& cfg, int64_t ratio, int64_t head_dim, bool rotate,
             bool simulate_release_quant);

  // x_TD -> entries [E, C] in plan order. Takes the tensor-op path when use_ops_path(x_TD) (model/exec_path.h): the
  // projections, pooling (cuda::compress_pool_forward on CUDA, compress_pool_forward<float> on the CPU), RMSNorm and
  // rope_apply on x's device; backward then follows the same path.
  Tensor forward(const Tensor& x_TD, const CompressPlan& plan, const RopeTable& rope, CompressorCtx* ctx) const;
  // dentries [E, C] -> dx_TD; accumulates the gradients of wkv, wgate, ape and norm.
  Tensor backward(const Tensor& dentries_EC, const CompressPlan& plan, const RopeTable& rope, const CompressorCtx& ctx);
  void visit(const ParamVisitor& f);
  void set_trainable(bool trainable);

  int64_t ratio() const { return ratio_; }
  int64_t head_dim() const { return head_dim_; }
  bool overlap() const { return ratio_ == 4; }
  // What the tensor-op path does not support (adapters, frozen weights, simulate_release_quant) and parameters off
  // `device`: one-line errors naming `module`.
  void check_ops_path(const std::string& module, Device device) const;

  Linear wkv;    // [coff*C, D]
  Linear wgate;  // [coff*C, D]
  Param ape;     // [m, coff*C]
  RMSNorm norm;  // [C]

 private:
  Tensor forward_ops(const Tensor& x_TD, const CompressPlan& plan, const RopeTable& rope, CompressorCtx* ctx) const;
  Tensor backward_ops(const Tensor& dentries_EC, const RopeTable& rope, const CompressorCtx& ctx);

  int64_t ratio_ = 0, head_dim_ = 0, rope_dim_ = 0;
  bool rotate_ = false, simulate_ = false, ue8m0_ = true;
};

}  // namespace dsv4
