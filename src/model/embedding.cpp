#include "model/embedding.h"

#include <cmath>
#include <limits>

#include "model/exec_path.h"
#include "runtime/model_ops.h"
#include "runtime/parallel.h"

namespace dsv4 {

Tensor Embedding::forward(const Tensor& ids_T) const {
  DSV4_CHECK(ids_T.dtype() == DType::I64 && ids_T.ndim() == 1, "Embedding {}: ids must be I64 [T], got {}", weight.name,
             ids_T.str());
  if (!shard_.group) return ops::index_select(weight.value, ids_on_weight_device(ids_T));
  // Vocab-parallel: the rows this rank holds, zeros elsewhere, summed over the group (exactly one rank adds each row).
  if (use_ops_path(weight.value)) {  // gathered rows added once each into zeros: the loop's values
    const LocalIds l = local_ids(ids_T);
    Tensor h = Tensor::zeros({l.tokens, weight.value.size(1)}, DType::F32, weight.value.device());
    if (!l.rows.empty()) {
      const Device dev = weight.value.device();
      ops::index_add(h, Tensor::from_vector<int64_t>({static_cast<int64_t>(l.positions.size())}, l.positions).to(dev),
                     ops::index_select(weight.value,
                                       Tensor::from_vector<int64_t>({static_cast<int64_t>(l.rows.size())}, l.rows).to(dev)));
    }
    group_sum(shard_.group, h);  // a device tensor: over the group's device twin (runtime/comm.h)
    return h;
  }
  const Tensor ids = ids_T.to(Device::cpu()).contiguous();
  const int64_t T = ids.size(0), D = weight.value.size(1), local = weight.value.size(0);
  Tensor h = Tensor::zeros({T, D}, DType::F32);
  const float* w = weight.value.data<float>();
  float* out = h.data<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids.data<int64_t>()[t];
    DSV4_CHECK(id >= 0 && id < shard_.vocab, "Embedding {}: id {} at position {} outside [0, {})", weight.name, id, t,
               shard_.vocab);
    const int64_t row = id - shard_.begin;
    if (row >= 0 && row < local) std::copy(w + row * D, w + (row + 1) * D, out + t * D);
  }
  group_sum(shard_.group, h);
  return h;
}

void Embedding::backward(const Tensor& dh_TD, const Tensor& ids_T) {
  if (!weight.trainable) return;
  if (!shard_.group) {
    ops::index_add(weight.grad_buffer(), ids_on_weight_device(ids_T), dh_TD);
    return;
  }
  if (use_ops_path(weight.value)) {  // the positions' gradient rows added to their vocabulary rows, ascending
    const LocalIds l = local_ids(ids_T);
    if (l.rows.empty()) return;
    const Device dev = weight.value.device();
    ops::index_add(weight.grad_buffer(),
                   Tensor::from_vector<int64_t>({static_cast<int64_t>(l.rows.size())}, l.rows).to(dev),
                   ops::index_select(dh_TD, Tensor::from_vector<int64_t>({static_cast<int64_t>(l.positions.size())},
                                                                         l.positions).to(dev)));
    return;
  }
  const Tensor ids = ids_T.to(Device::cpu()).contiguous();
  const Tensor dh = dh_TD.contiguous();
  const int64_t T = ids.size(0), D = weight.value.size(1), local = weight.value.size(0);
  float* g = weight.grad_buffer().data<float>();
  const float* d = dh.data<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = ids.data<int64_t>()[t] - shard_.begin;
    if (row < 0 || row >= local) continue;
    for (int64_t k = 0; k < D; ++k) g[row * D + k] += d[t * D + k];
  }
}

Tensor Embedding::ids_on_weight_device(const Tensor& ids_T) const { return ids_T.to(weight.value.device()); }

Embedding::LocalIds Embedding::local_ids(const Tensor& ids_T) const {
  const Tensor ids = ids_T.to(Device::cpu()).contiguous();
  LocalIds l;
  l.tokens = ids.size(0);
  const int64_t local = weight.value.size(0);
  for (int64_t t = 0; t < l.tokens; ++t) {
    const int64_t id = ids.data<int64_t>()[t];
    DSV4_CHECK(id >= 0 && id < shard_.vocab, "Embedding {}: id {} at position {} outside [0, {})", weight.name, id, t,
               shard_.vocab);
    const int64_t row = id - shard_.begin;
    if (row < 0 || row >= local) continue;
    l.positions.push_back(t);
    l.rows.push_back(row);
  }
  return l;
}

void Embedding::set_vocab_shard(const Communicator* group, int64_t begin, int64_t local, int64_t vocab) {
  const int64_t D = weight.value.size(1);
  DSV4_CHECK(begin >= 0 && local >= 0 && begin + local <= vocab, "Embedding {}: bad vocab shard [{}, {}) of {}",
             weight.name, begin, begin + local, vocab);
  shard_ = VocabShard{group, begin, vocab};
  weight.value = Tensor::zeros({local, D}, DType::F32);
  weight.grad = Tensor();
  if (group) weight.set_tp_split(0, begin, vocab);
}

CrossEntropyResult cross_entropy(const Tensor& logits_TV, const Tensor& targets_T, bool with_grad, double normalizer,
                                 const VocabShard& shard) {
  DSV4_CHECK(logits_TV.dtype() == DType::F32 && logits_TV.ndim() == 2,
             "cross_entropy: logits must be F32 [T, V], got {}", logits_TV.str());
  DSV4_CHECK(targets_T.dtype() == DType::I64 && targets_T.ndim() == 1 && targets_T.size(0) == logits_TV.size(0),
             "cross_entropy: targets must be I64 [{}], got {}", logits_TV.size(0), targets_T.str());
  const Tensor logits = logits_TV.contiguous();
  // The targets on the host (validation, counts, the loss sum) and on the logits' device (the ce_* partials): one
  // transfer when they are on different devices, none on the CPU.
  const Tensor targets = targets_T.to(Device::cpu()).contiguous();
  const Tensor targets_dev = targets.to(logits.device());
  const int64_t T = logits.size(0), V = logits.size(1);
  const int64_t vocab = shard.group ? shard.vocab : V, begin = shard.group ? shard.begin : 0;
  const int64_t* y = targets.data<int64_t>();
  CrossEntropyResult r;
  for (int64_t t = 0; t < T; ++t) {
    DSV4_CHECK(y[t] == kIgnoreIndex || (y[t] >= 0 && y[t] < vocab),
               "cross_entropy: target {} at position {} outside [0, {})", y[t], t, vocab);
    r.counted += y[t] != kIgnoreIndex;
  }
  // The partials of runtime/model_ops (CPU or CUDA twin by the logits' device), reduced over the vocab group.
  Tensor m = ce_row_max(logits);
  group_max(shard.group, m);
  std::vector<double> sums = ce_sums(logits, targets_dev, m, begin);
  group_sum(shard.group, sums);
  const double norm = normalizer > 0 ? normalizer : static_cast<double>(r.counted);
  const Tensor m_host = m.to(Device::cpu());
  std::vector<double> lse(static_cast<size_t>(T), 0.0);
  double total = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (y[t] == kIgnoreIndex) continue;
    lse[static_cast<size_t>(t)] = static_cast<double>(m_host.data<float>()[t]) + std::log(sums[static_cast<size_t>(t)]);
    total += lse[static_cast<size_t>(t)] - sums[static_cast<size_t>(T + t)];
  }
  if (with_grad) r.dlogits_TV = ce_backward(logits, targets_dev, lse, norm, begin);
  r.loss = norm > 0 ? total / norm : 0.0;
  return r;
}

Tensor shift_targets(const Tensor& labels_T, int64_t batch, int64_t seq, int64_t shift) {
  DSV4_CHECK(labels_T.dtype() == DType::I64 && labels_T.numel() == batch * seq,
             "shift_targets: labels must be I64 with {} x {} entries, got {}", batch, seq, labels_T.str());
  const Tensor labels = labels_T.to(Device::cpu()).contiguous();  // host-side data (labels on any device)
  Tensor out = Tensor::empty({batch * seq}, DType::I64);
  const int64_t* l = labels.data<int64_t>();
  int64_t* o = out.data<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s) o[b * seq + s] = s + shift < seq ? l[b * seq + s + shift] : kIgnoreIndex;
  return out;
}

}  // namespace dsv4
