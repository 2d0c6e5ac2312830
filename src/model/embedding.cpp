#include "model/embedding.h"

#include <cmath>
#include <limits>

namespace dsv4 {

Tensor Embedding::forward(const Tensor& ids_T) const {
  DSV4_CHECK(ids_T.dtype() == DType::I64 && ids_T.ndim() == 1, "Embedding {}: ids must be I64 [T], got {}", weight.name,
             ids_T.str());
  return ops::index_select(weight.value, ids_T);
}

void Embedding::backward(const Tensor& dh_TD, const Tensor& ids_T) {
  if (!weight.trainable) return;
  ops::index_add(weight.grad_buffer(), ids_T, dh_TD);
}

CrossEntropyResult cross_entropy(const Tensor& logits_TV, const Tensor& targets_T, bool with_grad, double normalizer) {
  DSV4_CHECK(logits_TV.dtype() == DType::F32 && logits_TV.ndim() == 2 && logits_TV.device().is_cpu(),
             "cross_entropy: logits must be CPU F32 [T, V], got {}", logits_TV.str());
  DSV4_CHECK(targets_T.dtype() == DType::I64 && targets_T.ndim() == 1 && targets_T.size(0) == logits_TV.size(0),
             "cross_entropy: targets must be I64 [{}], got {}", logits_TV.size(0), targets_T.str());
  const Tensor logits = logits_TV.contiguous();
  const Tensor targets = targets_T.contiguous();
  const int64_t T = logits.size(0), V = logits.size(1);
  const float* z = logits.data<float>();
  const int64_t* y = targets.data<int64_t>();
  CrossEntropyResult r;
  for (int64_t t = 0; t < T; ++t) {
    DSV4_CHECK(y[t] == kIgnoreIndex || (y[t] >= 0 && y[t] < V), "cross_entropy: target {} at position {} outside [0, {})",
               y[t], t, V);
    r.counted += y[t] != kIgnoreIndex;
  }
  const double norm = normalizer > 0 ? normalizer : static_cast<double>(r.counted);
  if (with_grad) r.dlogits_TV = Tensor::zeros({T, V}, DType::F32);
  double total = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (y[t] == kIgnoreIndex) continue;
    const float* zt = z + t * V;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < V; ++v) m = std::max(m, zt[v]);
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<double>(zt[v] - m));
    const double lse = static_cast<double>(m) + std::log(s);
    total += lse - static_cast<double>(zt[y[t]]);
    if (with_grad && norm > 0) {
      float* g = r.dlogits_TV.data<float>() + t * V;
      for (int64_t v = 0; v < V; ++v) g[v] = static_cast<float>(std::exp(static_cast<double>(zt[v]) - lse) / norm);
      g[y[t]] -= static_cast<float>(1.0 / norm);
    }
  }
  r.loss = norm > 0 ? total / norm : 0.0;
  return r;
}

Tensor shift_targets(const Tensor& labels_T, int64_t batch, int64_t seq, int64_t shift) {
  DSV4_CHECK(labels_T.dtype() == DType::I64 && labels_T.numel() == batch * seq,
             "shift_targets: labels must be I64 with {} x {} entries, got {}", batch, seq, labels_T.str());
  const Tensor labels = labels_T.contiguous();
  Tensor out = Tensor::empty({batch * seq}, DType::I64);
  const int64_t* l = labels.data<int64_t>();
  int64_t* o = out.data<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s) o[b * seq + s] = s + shift < seq ? l[b * seq + s + shift] : kIgnoreIndex;
  return out;
}

}  // namespace dsv4
