#include "model/flops.h"

#include <algorithm>

namespace dsv4 {

FlopsPerToken model_flops_per_token(const ModelConfig& c, int64_t seq) {
  FlopsPerToken f;
  const double D = static_cast<double>(c.dim), H = static_cast<double>(c.n_heads), hd = static_cast<double>(c.head_dim);
  const double n = static_cast<double>(c.hc_mult), V = static_cast<double>(c.vocab_size);
  const double I = static_cast<double>(c.moe_inter_dim), k = static_cast<double>(c.n_activated_experts);
  double params = 0, fp8_params = 0, keys_sum = 0;
  int64_t layers_counted = 0;
  auto matmul = [&](double in, double out) { params += in * out; };
  auto fp8mm = [&](double in, double out) {  // a weight GEMM that runs in FP8 under train.precision = fp8
    matmul(in, out);
    fp8_params += in * out;
  };

  auto layer = [&](int64_t index, bool mtp_block) {
    const int64_t m = c.compress_ratio(index);
    // mHC mixing for attn and ffn sub-layers.
    matmul(n * D, (2 + n) * n);
    matmul(n * D, (2 + n) * n);
    // Attention projections.
    fp8mm(D, static_cast<double>(c.q_lora_rank));
    fp8mm(static_cast<double>(c.q_lora_rank), H * hd);
    fp8mm(D, hd);
    fp8mm(H * hd, static_cast<double>(c.o_lora_rank));  // grouped: G x (H*hd/G) x o_lora
    fp8mm(static_cast<double>(c.o_groups * c.o_lora_rank), D);
    double keys = 0, index_score = 0;
    for (int64_t t = 0; t < seq; ++t) {
      double kt = static_cast<double>(std::min<int64_t>(c.window_size, t + 1));
      if (m > 0) {
        const int64_t visible = (t + 1) / m;
        if (m == 4) {
          kt += static_cast<double>(std::min<int64_t>(c.index_topk, visible));
          index_score += static_cast<double>(visible);
        } else {
          kt += static_cast<double>(visible);
        }
      }
      keys += kt;
    }
    keys /= static_cast<double>(seq);
    index_score /= static_cast<double>(seq);
    keys_sum += keys;
    ++layers_counted;
    f.attention += 2 * 2 * H * hd * keys;
    if (m > 0) {
      const double coff = m == 4 ? 2 : 1;
      fp8mm(D, coff * hd);  // compressor wkv
      fp8mm(D, coff * hd);  // compressor wgate
    }
    if (m == 4) {
      const double nI = static_cast<double>(c.index_n_heads), cI = static_cast<double>(c.index_head_dim);
      fp8mm(static_cast<double>(c.q_lora_rank), nI * cI);
      fp8mm(D, nI);
      fp8mm(D, 2 * cI);
      fp8mm(D, 2 * cI);
      f.attention += 2 * nI * cI * index_score;
    }
    // MoE: gate, shared expert, k routed experts.
    matmul(D, static_cast<double>(c.n_routed_experts));
    fp8mm(D, 3 * I);
    fp8mm(k * D, 3 * I);
    if (mtp_block) {
      fp8mm(D, D);      // e_proj
      fp8mm(n * D, D);  // h_proj on each stream
      matmul(n * D, n);  // MTP hyper head
      matmul(D, V);      // shared head
    }
  };
  for (int64_t i = 0; i < c.n_layers; ++i) layer(i, false);
  for (int64_t j = 0; j < c.n_mtp_layers; ++j) layer(c.n_layers + j, true);
  matmul(n * D, n);  // hyper head
  matmul(D, V);      // output head
  f.active_params = params;
  f.forward = 2 * params + f.attention;
  f.fp8_gemm = 2 * fp8_params;
  f.mean_visible_keys = layers_counted ? keys_sum / static_cast<double>(layers_counted) : 0;
  return f;
}

}  // namespace dsv4
