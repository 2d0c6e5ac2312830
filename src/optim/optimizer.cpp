#include "optim/optimizer.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "model/exec_path.h"
#include "runtime/error.h"
#include "runtime/host_phases.h"
#include "runtime/model_ops.h"

namespace dsv4 {

namespace {

constexpr const char* kStepsKey = "optimizer/steps";

// Values, gradients and state: contiguous F32 on the parameter's device (the CPU, or a CUDA device whose updates run
// through runtime/model_ops.h).
void check_f32(const Tensor& t, const std::string& what, Device device) {
  DSV4_CHECK(t.dtype() == DType::F32 && t.is_contiguous() && t.device() == device &&
                 (device.is_cpu() || device.is_cuda()),
             "optimizer: {} is {} (needs a contiguous F32 tensor on {})", what, t.str(), device.str());
}

// Matrices of one Newton-Schulz call of the tensor-op path: at most this many elements (a matrix larger than this
// gets a call of its own). Bounds the batch buffer and newton_schulz_batched's workspaces (X X^T, ... per matrix).
constexpr int64_t kNsBatchElements = int64_t{1} << 26;

// State for checkpoints lives on the host: a deep copy of a CPU tensor, a device-to-host copy otherwise.
Tensor host_copy(const Tensor& t) { return t.device().is_cpu() ? t.clone() : t.to(Device::cpu()); }

Tensor i64_scalar(int64_t v) { return Tensor::from_vector<int64_t>({1}, {v}); }

std::string join(const std::vector<std::string>& v, size_t max_items = 20) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < max_items; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > max_items) s += fmt::format(", ... ({} more)", v.size() - max_items);
  return s;
}

}  // namespace

OptimizerConfig OptimizerConfig::for_model(const ModelConfig& cfg, OptimizerMode mode) {
  OptimizerConfig c;
  c.groups = GroupTable::deepseek_v4(cfg.o_groups);
  c.groups.mode = mode;
  return c;
}

void OptimizerConfig::validate() const {
  muon.validate();
  adamw.validate();
  for (const GroupRule& r : groups.rules) {
    DSV4_CHECK(!r.pattern.empty(), "optimizer group rule with an empty pattern");
    DSV4_CHECK(r.row_blocks >= 1 && (r.group == OptGroup::Muon || r.row_blocks == 1),
               "optimizer group rule '{}': row blocks apply to muon only and must be >= 1", format_group_rule(r));
  }
}

std::vector<Param*> model_params(Model& model) {
  std::vector<Param*> out;
  model.visit([&](Param& p) { out.push_back(&p); });
  return out;
}

Optimizer::Optimizer(std::vector<Param*> params, OptimizerConfig cfg, OptimizerSharding sharding)
    : sharding_(sharding), cfg_(std::move(cfg)) {
  cfg_.validate();
  slots_.reserve(params.size());
  const Parallel* par = sharding_.parallel;
  // Greedy owner choice, separately for dense parameters (dp replicas) and experts (edp replicas): the next parameter
  // goes to the replica with the fewest elements so far (global sizes, so every tp rank decides alike).
  std::vector<int64_t> dense_load(static_cast<size_t>(par ? par->dp_size() : 1), 0);
  std::vector<int64_t> expert_load(static_cast<size_t>(par ? par->edp_size() : 1), 0);
  std::vector<int64_t> tp_load(static_cast<size_t>(par ? par->tp_size() : 1), 0);
  // Tensors only this tp rank has (TpLocal) are balanced apart, so the shared sequence stays identical on every tp rank.
  std::vector<int64_t> local_load(static_cast<size_t>(par ? par->dp_size() : 1), 0);
  std::vector<int64_t> world_load(static_cast<size_t>(par ? par->world_size() : 1), 0);
  for (Param* p : params) {
    DSV4_CHECK(p != nullptr, "optimizer: null parameter");
    DSV4_CHECK(index_.emplace(p->name, slots_.size()).second, "optimizer: parameter {} given twice", p->name);
    Slot s;
    s.p = p;
    s.group = group_of(*p, cfg_.groups);
    if (s.group != OptGroup::None && par) {
      // Replicas: experts over edp; tp slices and tp-local tensors over dp (each tp rank holds its own part);
      // whole tensors every rank holds (replicated / tp-partial) over the whole world.
      const bool expert = p->placement == Placement::Expert;
      const bool whole = p->placement == Placement::Replicated || p->placement == Placement::TpPartial;
      s.replicas = expert ? par->edp() : whole ? par->world() : par->dp();
      std::vector<int64_t>& load = expert                                   ? expert_load
                                   : whole                                  ? world_load
                                   : p->placement == Placement::TpLocal ? local_load
                                                                            : dense_load;
      const int64_t cost = p->global_shape().numel();
      if (sharding_.zero1) {
        s.owner = std::min_element(load.begin(), load.end()) - load.begin();
        load[static_cast<size_t>(s.owner)] += cost;
        s.owned = s.owner == group_rank(s.replicas);
      }
      if (s.group == OptGroup::Muon && p->placement == Placement::TpSplit) {
        s.tp_owner = std::min_element(tp_load.begin(), tp_load.end()) - tp_load.begin();
        tp_load[static_cast<size_t>(s.tp_owner)] += cost;
      }
    }
    if (s.group != OptGroup::None && s.owned) {
      const Device dev = p->value.device();
      check_f32(p->value, p->name, dev.is_cuda() ? dev : Device::cpu());
      if (s.group == OptGroup::Muon) {
        s.row_blocks = muon_row_blocks(p->name, cfg_.groups);
        s.momentum = Tensor::zeros(p->value.shape(), DType::F32, dev);
      } else {
        s.exp_avg = Tensor::zeros(p->value.shape(), DType::F32, dev);
        s.exp_avg_sq = Tensor::zeros(p->value.shape(), DType::F32, dev);
      }
    }
    slots_.push_back(std::move(s));
  }
}

OptimizerStepStats Optimizer::step(double lr) {
  DSV4_CHECK(std::isfinite(lr) && lr >= 0, "optimizer: learning rate {} must be finite and >= 0", lr);
  OptimizerStepStats st;
  std::vector<Slot*> ops_muon;  // Muon on the tensor-op path: orthogonalised in batches after the loop
  struct AdamWLists {           // AdamW on the tensor-op path: one adamw_steps call per device after the loop
    Device device;
    std::vector<Tensor> w, g, m, v;
    std::vector<AdamWScalars> s;
  };
  std::vector<AdamWLists> ops_adamw;
  for (Slot& s : slots_) {
    if (s.group == OptGroup::None) continue;
    Param& p = *s.p;
    if (!p.grad.defined()) {
      ++st.skipped;
      continue;
    }
    const Device dev = p.value.device().is_cuda() ? p.value.device() : Device::cpu();
    check_f32(p.value, p.name, dev);
    check_f32(p.grad, p.name + " gradient", dev);
    DSV4_CHECK(p.grad.shape() == p.value.shape(), "optimizer: {} gradient {} does not match the value {}", p.name,
               p.grad.shape().str(), p.value.shape().str());
    if (!s.owned) continue;
    ++s.step;
    const bool ops_path = use_ops_path(p.value);
    if (ops_path) check_f32(s.group == OptGroup::Muon ? s.momentum : s.exp_avg, p.name + " optimizer state", dev);
    if (s.group == OptGroup::Muon) {
      if (p.placement == Placement::TpSplit && sharding_.parallel && sharding_.parallel->tp())
        muon_step(s, lr);
      else if (ops_path)
        ops_muon.push_back(&s);
      else
        muon_update(p.value.data<float>(), p.grad.data<float>(), s.momentum.data<float>(), p.value.size(0),
                    p.value.size(1), s.row_blocks, lr, cfg_.muon);
      ++st.muon;
    } else {
      if (ops_path) {
        auto it = std::find_if(ops_adamw.begin(), ops_adamw.end(), [&](const AdamWLists& l) { return l.device == dev; });
        if (it == ops_adamw.end()) it = ops_adamw.insert(ops_adamw.end(), AdamWLists{dev, {}, {}, {}, {}, {}});
        it->w.push_back(p.value);
        it->g.push_back(p.grad);
        it->m.push_back(s.exp_avg);
        it->v.push_back(s.exp_avg_sq);
        it->s.push_back(
            adamw_scalars(cfg_.adamw.beta1, cfg_.adamw.beta2, cfg_.adamw.eps, cfg_.adamw.weight_decay, s.step, lr));
      } else {
        adamw_update(p.value.data<float>(), p.grad.data<float>(), s.exp_avg.data<float>(),
                     s.exp_avg_sq.data<float>(), p.value.numel(), s.step, lr, cfg_.adamw);
      }
      ++st.adamw;
    }
  }
  for (const AdamWLists& l : ops_adamw) {
    const HostPhase phase("optimizer: adamw", HostPhase::Sync::Device);
    adamw_steps(l.w, l.g, l.m, l.v, l.s);
  }
  if (!ops_muon.empty()) st.ns_calls = muon_ops_step(ops_muon, lr);
  {
    const HostPhase phase("optimizer: broadcast from the owners", HostPhase::Sync::Device);
    broadcast_from_owners();
  }
  ++steps_;
  return st;
}

int64_t Optimizer::muon_ops_step(const std::vector<Slot*>& slots, double lr) {
  // Batches: the Muon matrices (row blocks) of one shape on one device, in order of first appearance, cut into runs of
  // at most kNsBatchElements. The CPU path orthogonalises each matrix by itself; newton_schulz_batched runs the same
  // computation per matrix (CPU twin: the same newton_schulz loop; CUDA: batched GEMMs).
  struct Batch {
    Device device;
    int64_t block_rows = 0, cols = 0, matrices = 0;
    std::vector<Slot*> slots;
  };
  std::vector<Batch> batches;
  for (Slot* s : slots) {
    const Tensor& v = s->p->value;
    const int64_t br = v.size(0) / s->row_blocks, cols = v.size(1);
    const int64_t elems = s->row_blocks * br * cols;
    auto it = std::find_if(batches.rbegin(), batches.rend(), [&](const Batch& b) {
      return b.device == v.device() && b.block_rows == br && b.cols == cols;
    });
    if (it == batches.rend() || it->matrices * br * cols + elems > kNsBatchElements) {
      batches.push_back({v.device(), br, cols, 0, {}});
      it = batches.rbegin();
    }
    it->slots.push_back(s);
    it->matrices += s->row_blocks;
  }
  const MuonConfig& mc = cfg_.muon;
  for (Batch& b : batches) {
    Tensor u_all = Tensor::empty({b.matrices, b.block_rows, b.cols}, DType::F32, b.device);
    const auto u_of = [&](size_t i, int64_t first) {
      const Slot& s = *b.slots[i];
      return u_all.slice(0, first, first + s.row_blocks).view(s.p->value.shape());
    };
    std::vector<Tensor> values, grads, momenta, us;  // the batch's slots, u their rows of u_all
    int64_t first = 0;
    for (size_t i = 0; i < b.slots.size(); ++i) {
      Slot& s = *b.slots[i];
      values.push_back(s.p->value);
      grads.push_back(s.p->grad);
      momenta.push_back(s.momentum);
      us.push_back(u_of(i, first));
      first += s.row_blocks;
    }
    {
      const HostPhase phase("optimizer: muon momentum", HostPhase::Sync::Device);
      muon_momentum_steps(grads, momenta, us, static_cast<float>(mc.momentum), mc.nesterov);
    }
    {
      const std::string name = host_phases_enabled() ? fmt::format("optimizer: newton-schulz [{} x {} x {}]",
                                                                    b.matrices, b.block_rows, b.cols)
                                                      : std::string();
      const HostPhase phase(name.c_str(), HostPhase::Sync::Device);
      newton_schulz_batched(u_all, mc.ns_schedule, mc.ns_eps, mc.precision);
    }
    const HostPhase phase("optimizer: muon apply", HostPhase::Sync::Device);
    muon_apply_steps(values, us, muon_apply_scalars(lr, mc.weight_decay, mc.update_scale, b.block_rows, b.cols));
  }
  return static_cast<int64_t>(batches.size());
}

void Optimizer::muon_step(Slot& s, double lr) {
  Param& p = *s.p;
  const Communicator* tp = sharding_.parallel->tp();
  const Shape global = p.global_shape();
  const int64_t rows = global[0], cols = global[1], n = p.value.numel();
  DSV4_CHECK(p.shard_dim == 0 || p.shard_dim == 1, "optimizer: {} is split along dim {} (muon needs 0 or 1)", p.name,
             p.shard_dim);
  DSV4_CHECK(p.shard_offset == split_range(p.global_dim, tp->size(), tp->rank()).begin,
             "optimizer: {} holds [{}, ...) of dim {}, not this tp rank's balanced range", p.name, p.shard_offset,
             p.shard_dim);
  const int64_t block_rows = rows / s.row_blocks;
  const bool ops_path = use_ops_path(p.value);  // the runtime ops (CUDA twins); collectives over the device twins
  const Device dev = p.value.device();
  const MuonConfig& mc = cfg_.muon;
  auto orthogonalize = [&](Tensor& m, int64_t m_rows, int64_t blocks) {
    if (!ops_path) {
      muon_orthogonalize(m.data<float>(), m_rows, cols, blocks, mc);
      return;
    }
    Tensor b = m.view({blocks, m_rows / blocks, cols});
    newton_schulz_batched(b, mc.ns_schedule, mc.ns_eps, mc.precision);
  };
  Tensor u = Tensor::empty(p.value.shape(), DType::F32, dev);
  if (ops_path)
    muon_momentum_step(p.grad, s.momentum, u, static_cast<float>(mc.momentum), mc.nesterov);
  else
    muon_momentum(p.grad.data<float>(), s.momentum.data<float>(), u.data<float>(), n, mc);
  const int64_t local_rows = p.value.size(0);
  if (p.shard_dim == 0 && s.row_blocks > 1 && p.shard_offset % block_rows == 0 && local_rows % block_rows == 0) {
    // Whole Muon blocks here (wo_a split by output groups): orthogonalise them locally.
    orthogonalize(u, local_rows, local_rows / block_rows);
  } else {
    // Gather U (dim 1 splits travel transposed so the gathered rows are contiguous), orthogonalise on the owner,
    // broadcast, keep this rank's slice.
    const std::vector<int64_t> parts = split_rows(tp, p.global_dim);
    Tensor full = p.shard_dim == 0 ? gather_rows(tp, u, parts) : gather_rows(tp, u.transpose(0, 1).contiguous(), parts);
    if (p.shard_dim == 1) full = full.transpose(0, 1).contiguous();
    if (tp->rank() == s.tp_owner) orthogonalize(full, rows, s.row_blocks);
    tp->broadcast(full, static_cast<int>(s.tp_owner));
    ops::copy(p.local_part(full), u);
  }
  if (ops_path)
    muon_apply_step(p.value, u, muon_apply_scalars(lr, mc.weight_decay, mc.update_scale, block_rows, cols));
  else
    muon_apply(p.value.data<float>(), u.data<float>(), n, block_rows, cols, lr, mc);
}

void Optimizer::broadcast_from_owners() {
  if (!sharding_.parallel || !sharding_.zero1) return;
  // One flat buffer per (replica group, owner): the owner's new values travel in one broadcast.
  const Parallel& par = *sharding_.parallel;
  for (const Communicator* g : {par.dp(), par.world(), par.edp()}) {
    if (!g) continue;
    for (int64_t owner = 0; owner < g->size(); ++owner) {
      std::vector<Slot*> mine;
      int64_t total = 0;
      for (Slot& s : slots_) {
        if (s.group == OptGroup::None || !s.p->grad.defined() || s.replicas != g || s.owner != owner) continue;
        mine.push_back(&s);
        total += s.p->value.numel();
      }
      if (total == 0) continue;
      const Device dev = mine.front()->p->value.device();
      if (!dev.is_cpu()) {  // device values: the same flat buffer on the device, over the group's device twin
        Tensor flat = Tensor::empty({total}, DType::F32, dev);
        int64_t off = 0;
        for (Slot* s : mine) {
          Tensor part = flat.slice(0, off, off + s->p->value.numel()).view(s->p->value.shape());
          if (g->rank() == owner) ops::copy(s->p->value, part);
          off += s->p->value.numel();
        }
        g->broadcast(flat, static_cast<int>(owner));
        off = 0;
        for (Slot* s : mine) {
          if (g->rank() != owner) ops::copy(flat.slice(0, off, off + s->p->value.numel()).view(s->p->value.shape()),
                                            s->p->value);
          off += s->p->value.numel();
        }
        continue;
      }
      Tensor flat = Tensor::empty({total}, DType::F32);
      float* f = flat.data<float>();
      if (g->rank() == owner)
        for (Slot* s : mine) f = std::copy_n(s->p->value.data<float>(), s->p->value.numel(), f);
      g->broadcast(flat, static_cast<int>(owner));
      f = flat.data<float>();
      if (g->rank() != owner)
        for (Slot* s : mine) {
          std::copy_n(f, s->p->value.numel(), s->p->value.data<float>());
          f += s->p->value.numel();
        }
    }
  }
}

bool Optimizer::owns(const std::string& name) const { return slot(name).owned; }

const Optimizer::Slot& Optimizer::slot(const std::string& name) const {
  const auto it = index_.find(name);
  DSV4_CHECK(it != index_.end(), "optimizer: no parameter named {}", name);
  return slots_[it->second];
}

OptGroup Optimizer::group(const std::string& name) const { return slot(name).group; }
int64_t Optimizer::param_step(const std::string& name) const { return slot(name).step; }
int64_t Optimizer::row_blocks(const std::string& name) const {
  const Slot& s = slot(name);
  return s.group == OptGroup::Muon ? s.row_blocks : 0;
}

int64_t Optimizer::count(OptGroup g) const {
  int64_t n = 0;
  for (const Slot& s : slots_) n += s.group == g;
  return n;
}

std::vector<std::pair<std::string, OptGroup>> Optimizer::assignment() const {
  std::vector<std::pair<std::string, OptGroup>> out;
  out.reserve(slots_.size());
  for (const Slot& s : slots_) out.emplace_back(s.p->name, s.group);
  return out;
}

std::vector<Param*> Optimizer::optimised_params() const {
  std::vector<Param*> out;
  for (const Slot& s : slots_)
    if (s.group != OptGroup::None) out.push_back(s.p);
  return out;
}

std::map<std::string, Tensor> Optimizer::state_dict() const {
  std::map<std::string, Tensor> out;
  for (const Slot& s : slots_) {
    const std::string& n = s.p->name;
    if (!s.owned) continue;
    if (s.group == OptGroup::Muon) {
      out[n + "/momentum"] = host_copy(s.momentum);
    } else if (s.group == OptGroup::AdamW) {
      out[n + "/exp_avg"] = host_copy(s.exp_avg);
      out[n + "/exp_avg_sq"] = host_copy(s.exp_avg_sq);
    } else {
      continue;
    }
    out[n + "/step"] = i64_scalar(s.step);
  }
  out[kStepsKey] = i64_scalar(steps_);
  return out;
}

void Optimizer::load_state_dict(const std::map<std::string, Tensor>& state, const std::string& source) {
  std::vector<std::string> missing, unexpected, wrong_group, bad;
  std::set<std::string> expected;
  auto expect = [&](const std::string& key, const Shape& shape, DType dtype) {
    expected.insert(key);
    const auto it = state.find(key);
    if (it == state.end()) {
      missing.push_back(key);
      return;
    }
    const Tensor& t = it->second;
    if (!t.defined()) {
      bad.push_back(key + " (undefined tensor)");
    } else if (t.dtype() != dtype || !(t.shape() == shape)) {
      bad.push_back(fmt::format("{} ({}{} expected {}{})", key, dtype_name(t.dtype()), t.shape().str(),
                                dtype_name(dtype), shape.str()));
    } else if (dtype == DType::I64 && t.to(Device::cpu()).data<int64_t>()[0] < 0) {
      bad.push_back(key + " (negative step count)");
    }
  };
  for (const Slot& s : slots_) {
    const std::string& n = s.p->name;
    if (!s.owned) continue;
    if (s.group == OptGroup::Muon) {
      expect(n + "/momentum", s.p->value.shape(), DType::F32);
    } else if (s.group == OptGroup::AdamW) {
      expect(n + "/exp_avg", s.p->value.shape(), DType::F32);
      expect(n + "/exp_avg_sq", s.p->value.shape(), DType::F32);
    } else {
      continue;
    }
    expect(n + "/step", Shape{1}, DType::I64);
  }
  expect(kStepsKey, Shape{1}, DType::I64);
  for (const auto& [key, t] : state) {
    if (expected.count(key)) continue;
    const size_t slash = key.rfind('/');
    const std::string pname = slash == std::string::npos ? key : key.substr(0, slash);
    const std::string field = slash == std::string::npos ? "" : key.substr(slash + 1);
    const auto it = index_.find(pname);
    if (it != index_.end() && (field == "momentum" || field == "exp_avg" || field == "exp_avg_sq" || field == "step")) {
      const OptGroup here = slots_[it->second].group;
      const char* there = field == "momentum" ? "muon" : field == "step" ? "another group" : "adamw";
      wrong_group.push_back(fmt::format("{} ({} state, but the parameter is in group {} here)", key, there,
                                        group_name(here)));
    } else {
      unexpected.push_back(key);
    }
  }
  if (!missing.empty() || !unexpected.empty() || !wrong_group.empty() || !bad.empty()) {
    std::string msg =
        fmt::format("{}: optimizer state does not match this optimizer ({} parameters: {} muon, {} adamw)", source,
                    slots_.size(), count(OptGroup::Muon), count(OptGroup::AdamW));
    if (!missing.empty()) msg += fmt::format("; {} missing: {}", missing.size(), join(missing));
    if (!wrong_group.empty()) msg += fmt::format("; {} of another group: {}", wrong_group.size(), join(wrong_group));
    if (!unexpected.empty()) msg += fmt::format("; {} unexpected: {}", unexpected.size(), join(unexpected));
    if (!bad.empty()) msg += fmt::format("; {} mis-shaped: {}", bad.size(), join(bad));
    DSV4_FAIL("{}", msg);
  }
  auto load_i64 = [&](const std::string& key) {
    return state.at(key).to(Device::cpu()).contiguous().data<int64_t>()[0];
  };
  for (Slot& s : slots_) {
    const std::string& n = s.p->name;
    if (s.group == OptGroup::None || !s.owned) continue;
    if (s.group == OptGroup::Muon) {
      s.momentum.copy_from(state.at(n + "/momentum"));
    } else {
      s.exp_avg.copy_from(state.at(n + "/exp_avg"));
      s.exp_avg_sq.copy_from(state.at(n + "/exp_avg_sq"));
    }
    s.step = load_i64(n + "/step");
  }
  steps_ = load_i64(kStepsKey);
}

}  // namespace dsv4
