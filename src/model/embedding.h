// Token embedding and the language-model loss.
#pragma once

#include "model/param.h"
#include "runtime/comm.h"

namespace dsv4 {

// This rank's slice [begin, begin + local) of a vocabulary of `vocab` ids split over a tensor-parallel group
// (vocab-parallel embedding, output head and cross-entropy). group null: the whole vocabulary here.
struct VocabShard {
  const Communicator* group = nullptr;
  int64_t begin = 0, vocab = 0;
};

// h[t] = embed[ids[t]] (no scaling). ids: I64 [T] on any device: the rows are looked up (index_select) and their
// gradients accumulated (index_add) on the weight's device, where ids held elsewhere (the data loader's CPU ids with
// the weight on a GPU) are copied first, once per call. The vocab-parallel embedding (tensor parallelism > 1) runs on
// the CPU only so far: a weight on another device is an error naming it.
class Embedding {
 public:
  Embedding() = default;
  Embedding(std::string name, int64_t vocab, int64_t dim) : weight(std::move(name), Shape{vocab, dim}) {}

  Tensor forward(const Tensor& ids_T) const;
  // Accumulates d(embed) rows (on the weight's device); the ids are the forward's (any device).
  void backward(const Tensor& dh_TD, const Tensor& ids_T);
  void visit(const ParamVisitor& f) { f(weight); }
  // Keeps only rows [begin, begin + local) of a vocabulary of `vocab` ids split over `group` (vocab-parallel: each
  // rank looks up the ids it holds and the rows are summed over the group).
  void set_vocab_shard(const Communicator* group, int64_t begin, int64_t local, int64_t vocab);
  const VocabShard& shard() const { return shard_; }

  Param weight;  // [V, D] (or this rank's [V_local, D])

 private:
  Tensor ids_on_weight_device(const Tensor& ids_T) const;
  // Vocab-parallel: the positions whose id this rank holds and their local rows, ascending (ids checked).
  struct LocalIds {
    int64_t tokens = 0;
    std::vector<int64_t> positions, rows;
  };
  LocalIds local_ids(const Tensor& ids_T) const;

  VocabShard shard_;
};

inline constexpr int64_t kIgnoreIndex = -100;

struct CrossEntropyResult {
  double loss = 0;       // sum of -log p(target) over counted tokens, divided by `normalizer`
  int64_t counted = 0;   // tokens whose target != kIgnoreIndex
  Tensor dlogits_TV;     // d(loss)/d(logits), F32 [T, V] (only when requested)
};

// Cross-entropy of logits [T, V] (F32) against targets [T] (I64; kIgnoreIndex skips a token), reduced as
// sum / normalizer. normalizer <= 0 means "the number of counted tokens" (the mean, like torch and HF).
// Targets outside [0, V) other than kIgnoreIndex are errors naming the position.
// Devices: the logits on the CPU or a GPU (the ce_* partials of runtime/model_ops.h run there, the gradient stays
// there), the targets on any device (validated and counted on the host, copied to the logits' device when they are
// elsewhere); the loss comes back to the host as a double. Vocab-parallel logits must be on the CPU so far.
// Vocab-parallel (shard.group non-null): logits_TV holds this rank's columns [shard.begin, shard.begin + V_local) of a
// vocabulary of shard.vocab; the maxima, exponential sums and target logits are reduced over the group, so every
// rank gets the loss and counts of the whole vocabulary and the gradient of its columns.
CrossEntropyResult cross_entropy(const Tensor& logits_TV, const Tensor& targets_T, bool with_grad,
                                 double normalizer = 0, const VocabShard& shard = {});

// Targets for next-token prediction as HF shifts them: target[b, s] = labels[b, s + shift] within each row,
// kIgnoreIndex past the end. shift = 1 for the main model, 2 for the depth-1 MTP block. Labels on any device; the
// targets are built on the host (CPU tensor).
Tensor shift_targets(const Tensor& labels_T, int64_t batch, int64_t seq, int64_t shift);

}  // namespace dsv4
