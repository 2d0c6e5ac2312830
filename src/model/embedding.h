// Token embedding and the language-model loss.
#pragma once

#include "model/param.h"

namespace dsv4 {

// h[t] = embed[ids[t]] (no scaling). ids: I64 [T].
class Embedding {
 public:
  Embedding() = default;
  Embedding(std::string name, int64_t vocab, int64_t dim) : weight(std::move(name), Shape{vocab, dim}) {}

  Tensor forward(const Tensor& ids_T) const;
  // Accumulates d(embed) rows; the ids are the forward's.
  void backward(const Tensor& dh_TD, const Tensor& ids_T);
  void visit(const ParamVisitor& f) { f(weight); }

  Param weight;  // [V, D]
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
CrossEntropyResult cross_entropy(const Tensor& logits_TV, const Tensor& targets_T, bool with_grad,
                                 double normalizer = 0);

// Targets for next-token prediction as HF shifts them: target[b, s] = labels[b, s + shift] within each row,
// kIgnoreIndex past the end. shift = 1 for the main model, 2 for the depth-1 MTP block.
Tensor shift_targets(const Tensor& labels_T, int64_t batch, int64_t seq, int64_t shift);

}  // namespace dsv4
