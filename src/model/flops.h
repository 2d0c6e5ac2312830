// Model FLOPs per token, by the convention of shared/design/BENCHMARKS.md: forward = 2 x multiply-adds of every
// matmul a token goes through (q/kv/o projections, compressor and indexer projections, mHC mixing, gate, shared
// expert and the k routed experts, head, MTP) + attention 2 x 2 x heads x head_dim x (keys actually attended:
// window + visible compressed entries (HCA) or top-k (CSA)) + the indexer's scoring over visible entries.
// Training = 3 x forward. Embedding lookups count zero; recomputation does not count.
#pragma once

#include "model/config.h"

namespace dsv4 {

struct FlopsPerToken {
  double forward = 0;            // FLOPs of one token's forward, averaged over positions 0..seq-1
  double attention = 0;          // part of `forward` in attention scores/values (+ indexer scoring)
  double mean_visible_keys = 0;  // attended keys per query, averaged over layers and positions
  double active_params = 0;      // parameters a token's matmuls touch (embedding excluded)
  // Part of `forward` in the weight GEMMs that train.precision = fp8 runs in FP8 (model/matmul_precision.h: every
  // Linear, expert and grouped wo_a; not the output heads, the router gate, the mHC mixing or the attention core).
  double fp8_gemm = 0;
  double training() const { return 3 * forward; }
};

FlopsPerToken model_flops_per_token(const ModelConfig& cfg, int64_t seq);

}  // namespace dsv4
