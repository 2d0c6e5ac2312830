#include "optim/moe_bias.h"

#include "runtime/error.h"

namespace dsv4 {

void update_expert_bias(Param& bias, const std::vector<int64_t>& load, double speed) {
  DSV4_CHECK(bias.value.defined() && bias.value.dtype() == DType::F32 && bias.value.ndim() == 1 &&
                 bias.value.is_contiguous(),
             "expert bias update: {} must be a contiguous F32 vector, got {}", bias.name,
             bias.value.defined() ? bias.value.str() : std::string("undefined"));
  const int64_t E = bias.value.size(0);
  DSV4_CHECK(static_cast<int64_t>(load.size()) == E, "expert bias update: {} has {} experts but {} loads were given",
             bias.name, E, load.size());
  int64_t total = 0;
  for (int64_t l : load) {
    DSV4_CHECK(l >= 0, "expert bias update: negative load {} for {}", l, bias.name);
    total += l;
  }
  const float step = static_cast<float>(speed);
  Tensor host = bias.value.to(Device::cpu());  // the parameter itself on the CPU; E values through the host otherwise
  float* b = host.data<float>();
  for (int64_t i = 0; i < E; ++i) {
    const int64_t diff = total - E * load[static_cast<size_t>(i)];  // E * (mean - load_i)
    if (diff > 0) b[i] += step;
    else if (diff < 0) b[i] -= step;
  }
  if (!bias.value.device().is_cpu()) bias.value.copy_from(host);
}

void accumulate_moe_loads(std::vector<std::vector<int64_t>>& acc, const std::vector<MoEStats>& stats) {
  if (acc.empty()) {
    acc.resize(stats.size());
    for (size_t l = 0; l < stats.size(); ++l) acc[l].assign(stats[l].load.size(), 0);
  }
  DSV4_CHECK(acc.size() == stats.size(), "accumulate_moe_loads: {} layers accumulated but {} given", acc.size(),
             stats.size());
  for (size_t l = 0; l < stats.size(); ++l) {
    DSV4_CHECK(acc[l].size() == stats[l].load.size(), "accumulate_moe_loads: layer {} has {} experts, then {}", l,
               acc[l].size(), stats[l].load.size());
    for (size_t e = 0; e < acc[l].size(); ++e) acc[l][e] += stats[l].load[e];
  }
}

int64_t update_moe_biases(Model& model, const std::vector<std::vector<int64_t>>& loads, double speed) {
  std::vector<MoE*> moes;
  for (auto& b : model.layers) moes.push_back(&b->ffn);
  for (auto& m : model.mtp) moes.push_back(&m->block.ffn);
  DSV4_CHECK(loads.size() == moes.size(),
             "update_moe_biases: the model has {} MoE layers ({} main + {} MTP) but {} load vectors were given",
             moes.size(), model.layers.size(), model.mtp.size(), loads.size());
  int64_t updated = 0;
  for (size_t l = 0; l < moes.size(); ++l) {
    MoE& moe = *moes[l];
    if (moe.hash_routed() || !moe.gate_bias.value.defined()) continue;
    update_expert_bias(moe.gate_bias, loads[l], speed);
    ++updated;
  }
  return updated;
}

int64_t update_moe_biases(Model& model, const std::vector<MoEStats>& stats, double speed) {
  std::vector<std::vector<int64_t>> loads;
  loads.reserve(stats.size());
  for (const MoEStats& s : stats) loads.push_back(s.load);
  return update_moe_biases(model, loads, speed);
}

}  // namespace dsv4
