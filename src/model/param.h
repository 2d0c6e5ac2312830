// Param: one named model parameter with its FP32 value and gradient.
// Names are the native release checkpoint names ("layers.3.attn.wq_a.weight", "hc_head_fn", ...).
// Gradients accumulate (+=) in every backward so micro-batches can be summed; zero_grad() resets them.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace dsv4 {

// How a parameter is spread over the ranks of a parallel layout (runtime/parallel.h), which says how its gradient is
// completed after backward and which part of the global tensor this rank holds.
enum class Placement : uint8_t {
  Replicated,  // the whole tensor on every rank; tp ranks compute identical gradients: sum over dp
  TpPartial,   // the whole tensor on every rank; each tp rank's gradient is a partial sum: sum over dp and tp
  TpSplit,     // a slice along shard_dim over the tp group: sum over dp
  TpLocal,     // a whole tensor only this tp rank has (the adapter of an output group it holds): sum over dp
  Expert,      // a routed expert's tensor, held by one rank of each ep group: sum over edp
};

struct Param {
  std::string name;
  Tensor value;  // F32
  Tensor grad;   // F32, same shape; undefined until first needed
  bool trainable = true;
  Placement placement = Placement::Replicated;
  // TpSplit: this rank holds [shard_offset, shard_offset + value.size(shard_dim)) of global_dim along shard_dim.
  int shard_dim = -1;
  int64_t shard_offset = 0, global_dim = 0;

  // Marks the param as this rank's slice [offset, offset + local) of a dim of global size `global`.
  void set_tp_split(int dim, int64_t offset, int64_t global) {
    placement = Placement::TpSplit;
    shard_dim = dim;
    shard_offset = offset;
    global_dim = global;
  }
  // The shape of the whole tensor across the tp group.
  Shape global_shape() const {
    Shape s = value.shape();
    if (placement == Placement::TpSplit && shard_dim >= 0) s[shard_dim] = global_dim;
    return s;
  }

  Param() = default;
  Param(std::string n, const Shape& shape, Device device = Device::cpu())
      : name(std::move(n)), value(Tensor::zeros(shape, DType::F32, device)) {}

  // This rank's part of a tensor of the global shape (a view; the whole tensor unless TpSplit). Throws naming the
  // parameter when `full` does not have the global shape.
  Tensor local_part(const Tensor& full) const {
    const Shape g = global_shape();
    DSV4_CHECK(full.shape() == g, "{}: expected the global shape {}, got {}", name, g.str(), full.shape().str());
    if (placement != Placement::TpSplit) return full;
    return full.slice(shard_dim, shard_offset, shard_offset + value.size(shard_dim));
  }

  // The gradient buffer, allocated as zeros on first use.
  Tensor& grad_buffer() {
    if (!grad.defined()) grad = Tensor::zeros(value.shape(), DType::F32, value.device());
    return grad;
  }
  void zero_grad() {
    if (grad.defined()) ops::fill(grad, 0.0);
  }
};

using ParamVisitor = std::function<void(Param&)>;

// Gives every listed parameter that has no gradient yet a zeroed gradient that is a view into one flat F32 buffer per
// device, laid out in list order (parameters already holding a gradient keep theirs). Returns the buffers: clearing
// one clears all its gradients in a single call, and a run of neighbours in the list is one contiguous range (the
// gradient sync reduces such runs in place, optim/grad_sync.h).
std::vector<Tensor> allocate_grad_buffers(const std::vector<Param*>& params);

// Whether t's memory lies inside `buffer` (same storage).
bool shares_storage(const Tensor& t, const Tensor& buffer);

}  // namespace dsv4
