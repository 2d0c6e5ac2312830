#include "model/indexer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "model/quant_sim.h"
#include "model/sparse_attention.h"
#include "runtime/compress_math.h"
#include "runtime/host_phases.h"
#include "runtime/cpu_blas.h"
#include "runtime/model_ops.h"

#if defined(DSV4_WITH_CUDA)
#include "kernels/attention_kernels.h"
#endif

namespace dsv4 {

namespace {
int64_t tp_of(const Parallel* p) { return p ? p->tp_size() : 1; }
}  // namespace

Indexer::Indexer(const std::string& prefix, const ModelConfig& cfg, bool simulate_release_quant,
                 const Parallel* parallel)
    : n_heads_(cfg.index_n_heads / tp_of(parallel)), head_dim_(cfg.index_head_dim), topk_(cfg.index_topk),
      global_heads_(cfg.index_n_heads), simulate_(simulate_release_quant) {
  const int64_t tp = tp_of(parallel);
  DSV4_CHECK(cfg.index_n_heads % tp == 0,
             "Indexer {}: config 'index_n_heads' = {} is not divisible by the tensor-parallel degree tp = {}", prefix,
             cfg.index_n_heads, tp);
  wq_b = Linear(prefix + "wq_b.weight", cfg.q_lora_rank, n_heads_ * head_dim_);
  weights_proj = Linear(prefix + "weights_proj.weight", cfg.dim, n_heads_);
  compressor = Compressor(prefix + "compressor.", cfg, 4, cfg.index_head_dim, /*rotate=*/true, simulate_release_quant);
  if (tp > 1) {
    tp_ = parallel->tp();
    const int64_t h0 = parallel->tp_rank() * n_heads_;
    wq_b.weight.set_tp_split(0, h0 * head_dim_, global_heads_ * head_dim_);
    weights_proj.weight.set_tp_split(0, h0, global_heads_);
  }
  visit([](Param& p) { p.trainable = false; });  // no gradient reaches them from the LM loss
}

void Indexer::visit(const ParamVisitor& f) {
  wq_b.visit(f);
  weights_proj.visit(f);
  compressor.visit(f);
}

std::vector<int64_t> indexer_score_offsets(const CompressPlan& plan) {
  const size_t T = plan.n_visible.size();
  std::vector<int64_t> offsets(T + 1, 0);
  for (size_t t = 0; t < T; ++t) offsets[t + 1] = offsets[t] + plan.n_visible[t];
  return offsets;
}

template <typename T>
void indexer_scores_rows(const T* q, const T* k, const T* w, const CompressPlan& plan, int64_t nI, int64_t cI,
                         T score_scale, T weight_scale, const std::vector<int64_t>& offsets, T* values) {
  const int64_t T_ = static_cast<int64_t>(plan.first_entry.size());
  DSV4_CHECK(static_cast<int64_t>(offsets.size()) == T_ + 1, "indexer_scores_rows: {} offsets for {} tokens",
             offsets.size(), T_);
  // Chunks of queries sharing their document's entries: dots [chunk * nI, nv] = q_chunk @ K_doc^T by GEMM.
  constexpr int64_t kChunk = 64;
  std::vector<T> dots;
  int64_t t0 = 0;
  while (t0 < T_) {
    const int64_t fe = plan.first_entry[static_cast<size_t>(t0)];
    int64_t t1 = t0 + 1;
    while (t1 < T_ && t1 - t0 < kChunk && plan.first_entry[static_cast<size_t>(t1)] == fe) ++t1;
    const int64_t nv = plan.n_visible[static_cast<size_t>(t1 - 1)];  // non-decreasing within a document
    for (int64_t t = t0; t < t1; ++t) {
      T* out = values + offsets[static_cast<size_t>(t)];
      std::fill(out, out + plan.n_visible[static_cast<size_t>(t)], T(0));
    }
    if (nv > 0) {
      dots.resize(static_cast<size_t>((t1 - t0) * nI * nv));
      if constexpr (std::is_same_v<T, float>) {
        cpu_gemm(false, true, (t1 - t0) * nI, nv, cI, 1.0f, q + t0 * nI * cI, cI, k + fe * cI, cI, 0.0f, dots.data(),
                 nv);
      } else {
        for (int64_t r = 0; r < (t1 - t0) * nI; ++r)
          for (int64_t e = 0; e < nv; ++e) {
            T d = 0;
            for (int64_t i = 0; i < cI; ++i) d += q[(t0 * nI + r) * cI + i] * k[(fe + e) * cI + i];
            dots[static_cast<size_t>(r * nv + e)] = d;
          }
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = plan.n_visible[static_cast<size_t>(t)];
        T* out = values + offsets[static_cast<size_t>(t)];
        for (int64_t h = 0; h < nI; ++h) {
          const T wt = w[t * nI + h] * weight_scale;
          const T* d = dots.data() + ((t - t0) * nI + h) * nv;
          for (int64_t e = 0; e < n; ++e) out[e] += indexer_score_term(d[e], wt, score_scale);
        }
      }
    }
    t0 = t1;
  }
}

template void indexer_scores_rows<float>(const float*, const float*, const float*, const CompressPlan&, int64_t,
                                         int64_t, float, float, const std::vector<int64_t>&, float*);
template void indexer_scores_rows<double>(const double*, const double*, const double*, const CompressPlan&, int64_t,
                                          int64_t, double, double, const std::vector<int64_t>&, double*);

IndexScores Indexer::scores(const Tensor& x_TD, const Tensor& qr_TQ, const std::vector<int64_t>& pos,
                            const CompressPlan& plan, const RopeTable& rope) const {
  const int64_t T = x_TD.size(0), nI = n_heads_, cI = head_dim_;
  DSV4_CHECK(static_cast<int64_t>(pos.size()) == T && qr_TQ.size(0) == T &&
                 static_cast<int64_t>(plan.first_entry.size()) == T,
             "Indexer: {} tokens, {} positions, qr {}, plan of {} tokens", T, pos.size(), qr_TQ.str(),
             plan.first_entry.size());
  // Queries [T, nI, cI]: RoPE per head (rows of cI with stride cI, each head of token t at position pos[t]).
  Tensor q = wq_b.forward(qr_TQ, nullptr);
  float* qp = q.data<float>();
  std::vector<int64_t> head_pos(static_cast<size_t>(T * nI));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < nI; ++h) head_pos[static_cast<size_t>(t * nI + h)] = pos[static_cast<size_t>(t)];
  rope_rows<float>(qp, T * nI, cI, cI, head_pos.data(), rope, false);
  if (simulate_) {
    hadamard_rows<float>(qp, T * nI, cI, cI);
    fp4_block_fake_quant_rows(qp, T * nI, cI, cI, 32);
  }
  const Tensor k = compressor.forward(x_TD, plan, rope, nullptr);  // [E, cI]
  const Tensor w = weights_proj.forward(x_TD, nullptr);           // [T, nI]
  const float* kp = k.data<float>();
  const float* wp = w.data<float>();
  const float score_scale = static_cast<float>(std::pow(static_cast<double>(cI), -0.5));
  const float weight_scale = static_cast<float>(std::pow(static_cast<double>(global_heads_), -0.5));

  IndexScores s;
  s.offsets = indexer_score_offsets(plan);
  s.values.assign(static_cast<size_t>(s.offsets.back()), 0.0f);

  indexer_scores_rows<float>(qp, kp, wp, plan, nI, cI, score_scale, weight_scale, s.offsets, s.values.data());
  // Under tp: the sums over this rank's heads, completed over the tp group (identical on every tp rank).
  if (tp_ && !s.values.empty()) {
    const int64_t n = static_cast<int64_t>(s.values.size());
    Tensor all = Tensor::empty({n}, DType::F32);
    std::memcpy(all.data<float>(), s.values.data(), static_cast<size_t>(n) * sizeof(float));
    group_sum(tp_, all);
    std::memcpy(s.values.data(), all.data<float>(), static_cast<size_t>(n) * sizeof(float));
  }
  if (simulate_)  // elementwise, so rounding here equals rounding each query's scores as they are completed
    for (float& v : s.values) v = round_bf16(v);
  return s;
}

void Indexer::select_topk(const IndexScores& s, const CompressPlan& plan, int64_t topk, std::vector<int64_t>& offsets,
                          std::vector<int64_t>& ids) {
  const int64_t T = static_cast<int64_t>(plan.first_entry.size());
  offsets.assign(static_cast<size_t>(T + 1), 0);
  ids.clear();
  std::vector<int64_t> order;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = plan.n_visible[static_cast<size_t>(t)], k = std::min(topk, n);
    const int64_t fe = plan.first_entry[static_cast<size_t>(t)];
    const float* v = s.values.data() + s.offsets[static_cast<size_t>(t)];
    order.resize(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    if (k < n) {
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [v](int64_t a, int64_t b) {
        return v[a] > v[b] || (v[a] == v[b] && a < b);
      });
      order.resize(static_cast<size_t>(k));
      std::sort(order.begin(), order.end());
    }
    for (int64_t e : order) ids.push_back(fe + e);
    offsets[static_cast<size_t>(t + 1)] = static_cast<int64_t>(ids.size());
  }
}

// ---- tensor-op path ------------------------------------------------------------------------------------------
void Indexer::check_ops_path(const std::string& module, Device device) const {
  DSV4_CHECK(!simulate_, "{}: the tensor-op path (CUDA tensors) does not support simulate_release_quant yet", module);
  check_linear_for_ops(module, wq_b, device);
  check_linear_for_ops(module, weights_proj, device);
  compressor.check_ops_path(module, device);
}

void Indexer::select_topk_ops(const Tensor& x_TD, const Tensor& qr_TQ, const std::vector<int64_t>& pos,
                              const CompressPlan& plan, const RopeTable& rope, int64_t topk,
                              std::vector<int64_t>& offsets, std::vector<int64_t>& ids, Tensor* ids_device,
                              bool host_ids) const {
  const int64_t T = x_TD.size(0), nI = n_heads_, cI = head_dim_;
  const Device dev = x_TD.device();
  const std::string module = "Indexer " + wq_b.weight.name.substr(0, wq_b.weight.name.rfind("wq_b.weight"));
  DSV4_CHECK(static_cast<int64_t>(pos.size()) == T && qr_TQ.size(0) == T && qr_TQ.device() == dev &&
                 static_cast<int64_t>(plan.first_entry.size()) == T,
             "{}: {} tokens on {}, {} positions, qr {}, plan of {} tokens", module, T, dev.str(), pos.size(),
             qr_TQ.str(), plan.first_entry.size());
  check_ops_path(module, dev);
  const std::vector<int64_t> score_offsets = indexer_score_offsets(plan);
  if (ids_device) *ids_device = Tensor();
  if (score_offsets.back() == 0) {  // no query sees an entry
    offsets.assign(static_cast<size_t>(T + 1), 0);
    ids.clear();
    return;
  }
  Tensor q = wq_b.forward(qr_TQ, nullptr);  // [T, nI * cI]
  Tensor q_rows = q.view({T * nI, cI});
  rope_apply(q_rows, index_tensor(pos, dev), rope_inv_freq(rope, dev), false);
  const Tensor k = compressor.forward(x_TD, plan, rope, nullptr);  // [E, cI] (the compressor's tensor-op path)
  const Tensor w = weights_proj.forward(x_TD, nullptr);           // [T, nI]
  const float score_scale = static_cast<float>(std::pow(static_cast<double>(cI), -0.5));
  const float weight_scale = static_cast<float>(std::pow(static_cast<double>(global_heads_), -0.5));
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    void* stream = attention_kernel_stream(x_TD);
    const int64_t E = plan.entries();
    const int64_t n_scores = score_offsets.back();
    const int64_t max_visible = *std::max_element(plan.n_visible.begin(), plan.n_visible.end());
    const Tensor first_d = index_tensor(plan.first_entry, dev), offsets_d = index_tensor(score_offsets, dev);
    Tensor scores = Tensor::empty({n_scores}, DType::F32, dev);
    cuda::indexer_scores(q.data<float>(), k.data<float>(), w.data<float>(), first_d.data<int64_t>(),
                         offsets_d.data<int64_t>(), T, E, nI, cI, max_visible, score_scale, weight_scale,
                         /*round_bf16=*/false, scores.data<float>(), stream);
    group_sum(tp_, scores);  // under tp: this rank's heads, completed over the group (its device twin)
    cuda::indexer_topk_offsets(plan.n_visible, topk, offsets);
    const Tensor topk_offsets_d = index_tensor(offsets, dev);
    Tensor ids_d = Tensor::empty({std::max<int64_t>(offsets.back(), 1)}, DType::I32, dev);
    cuda::indexer_topk(scores.data<float>(), offsets_d.data<int64_t>(), first_d.data<int64_t>(),
                       topk_offsets_d.data<int64_t>(), T, E, ids_d.data<int32_t>(), stream);
    if (ids_device) *ids_device = ids_d;
    if (!host_ids && ids_device) {
      ids.clear();
      return;
    }
    const Tensor ids_h = [&] {
      const HostPhase phase("attention: CSA top-k to the host (waits for the GPU)");
      return ids_d.to(Device::cpu());  // waits for the stream
    }();
    const int32_t* p = ids_h.data<int32_t>();
    ids.assign(p, p + offsets.back());
#else
    fail_without_cuda("Indexer.select_topk_ops");
#endif
    return;
  }
  IndexScores s;
  s.offsets = score_offsets;
  s.values.assign(static_cast<size_t>(s.offsets.back()), 0.0f);
  indexer_scores_rows<float>(q.data<float>(), k.data<float>(), w.data<float>(), plan, nI, cI, score_scale,
                             weight_scale, s.offsets, s.values.data());
  if (tp_) {  // as scores(): the sums over this rank's heads, completed over the tp group
    Tensor all = Tensor::from_floats({static_cast<int64_t>(s.values.size())}, s.values);
    group_sum(tp_, all);
    s.values = all.to_floats();
  }
  select_topk(s, plan, topk, offsets, ids);
}

}  // namespace dsv4
