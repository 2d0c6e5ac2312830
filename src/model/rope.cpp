#include "model/rope.h"

#include <algorithm>

#include "runtime/error.h"

namespace dsv4 {

namespace {
// theta^(i / r) in FP32, as torch evaluates base ** (arange(0, r, 2).float() / r).
float pos_freq(int64_t rot_dim, double theta, int64_t i) {
  return std::pow(static_cast<float>(theta), static_cast<float>(i) / static_cast<float>(rot_dim));
}
}  // namespace

RopeTable RopeTable::plain(int64_t rot_dim, double theta) {
  DSV4_CHECK(rot_dim > 0 && rot_dim % 2 == 0, "RoPE: rotary dim {} must be even and positive", rot_dim);
  RopeTable t;
  t.rot_dim = rot_dim;
  for (int64_t i = 0; i < rot_dim; i += 2) t.inv_freq.push_back(1.0f / pos_freq(rot_dim, theta, i));
  return t;
}

RopeTable RopeTable::yarn(int64_t rot_dim, double theta, const YarnConfig& y) {
  RopeTable t = plain(rot_dim, theta);
  if (!y.enabled) return t;
  // DeepSeek/HF YaRN: blend interpolated (freq / factor) and extrapolated frequencies with a linear ramp over
  // the correction range [low, high] found from beta_fast / beta_slow rotations at original_seq_len.
  const double pi = 3.14159265358979323846;
  auto corr_dim = [&](double rotations) {
    return static_cast<double>(rot_dim) * std::log(static_cast<double>(y.original_seq_len) / (rotations * 2 * pi)) /
           (2 * std::log(theta));
  };
  double low = std::max(0.0, std::floor(corr_dim(y.beta_fast)));
  double high = std::min(static_cast<double>(rot_dim - 1), std::ceil(corr_dim(y.beta_slow)));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < rot_dim / 2; ++i) {
    // Same FP32 operation order as the reference: extrapolation weight = 1 - ramp.
    const float ramp = std::clamp((static_cast<float>(i) - static_cast<float>(low)) / static_cast<float>(high - low),
                                  0.0f, 1.0f);
    const float extrapolation = 1.0f - ramp;
    const float pf = pos_freq(rot_dim, theta, 2 * i);
    const float extra = 1.0f / pf;
    const float inter = 1.0f / (static_cast<float>(y.factor) * pf);
    t.inv_freq[static_cast<size_t>(i)] = inter * (1.0f - extrapolation) + extra * extrapolation;
  }
  return t;
}

RopeTable RopeTable::for_ratio(const ModelConfig& c, int64_t ratio) {
  return ratio == 0 ? plain(c.rope_head_dim, c.rope_theta) : yarn(c.rope_head_dim, c.compress_rope_theta, c.yarn);
}

Tensor rope_inv_freq(const RopeTable& table, Device device) {
  DSV4_CHECK(static_cast<int64_t>(table.inv_freq.size()) * 2 == table.rot_dim, "RoPE: {} frequencies for rot_dim {}",
             table.inv_freq.size(), table.rot_dim);
  return Tensor::from_vector<float>(Shape{static_cast<int64_t>(table.inv_freq.size())}, table.inv_freq).to(device);
}

Tensor index_tensor(const std::vector<int64_t>& pos, Device device) {
  return Tensor::from_vector<int64_t>(Shape{static_cast<int64_t>(pos.size())}, pos).to(device);
}

}  // namespace dsv4
