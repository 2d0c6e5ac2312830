// Param: one named model parameter with its FP32 value and gradient.
// Names are the native release checkpoint names ("layers.3.attn.wq_a.weight", "hc_head_fn", ...).
// Gradients accumulate (+=) in every backward so micro-batches can be summed; zero_grad() resets them.
#pragma once

#include <functional>
#include <string>

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace dsv4 {

struct Param {
  std::string name;
  Tensor value;  // F32
  Tensor grad;   // F32, same shape; undefined until first needed
  bool trainable = true;

  Param() = default;
  Param(std::string n, const Shape& shape, Device device = Device::cpu())
      : name(std::move(n)), value(Tensor::zeros(shape, DType::F32, device)) {}

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

}  // namespace dsv4
