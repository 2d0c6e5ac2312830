#include "train/train_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <sstream>

#include "runtime/error.h"

namespace dsv4 {

namespace {

enum class Kind { Bool, Int, Double, String, StringList, DoubleList };

struct Field {
  std::string section, key;
  Kind kind;
  void* ptr;
  double min = -std::numeric_limits<double>::infinity();
  double max = std::numeric_limits<double>::infinity();
  std::vector<std::string> choices;  // allowed strings (empty: any)
  std::string path() const { return section + "." + key; }
};

class Schema {
 public:
  explicit Schema(TrainConfig& c) {
    // model
    str("model", "preset", &c.model.preset, {"", "tiny", "small", "proxy-2b", "flash", "pro"});
    str("model", "config", &c.model.config);
    str("model", "checkpoint", &c.model.checkpoint);
    boolean("model", "simulate_release_quant", &c.model.simulate_release_quant);
    // parallel
    integer("parallel", "dp", &c.parallel.dp, 1);
    integer("parallel", "tp", &c.parallel.tp, 1);
    integer("parallel", "ep", &c.parallel.ep, 1);
    boolean("parallel", "zero1", &c.parallel.zero1);
    // data
    fields_.push_back({"data", "train", Kind::StringList, &c.data.train});
    fields_.push_back({"data", "weights", Kind::DoubleList, &c.data.weights, 0});
    str("data", "val", &c.data.val);
    integer("data", "seq_len", &c.data.seq_len, 1);
    integer("data", "micro_batch", &c.data.micro_batch, 1);
    integer("data", "grad_accum", &c.data.grad_accum, 1);
    boolean("data", "doc_masking", &c.data.doc_masking);
    integer("data", "seed", &c.data.seed, 0);
    // optim
    str("optim", "type", &c.optim.type, {"muon", "adamw"});
    real("optim", "lr", &c.optim.lr, 0);
    real("optim", "min_lr", &c.optim.min_lr, 0);
    str("optim", "schedule", &c.optim.schedule, {"wsd", "cosine"});
    integer("optim", "warmup_steps", &c.optim.warmup_steps, 0);
    real("optim", "decay_start", &c.optim.decay_start, 0, 1);
    real("optim", "weight_decay", &c.optim.weight_decay, 0);
    real("optim", "beta1", &c.optim.beta1, 0, 1);
    real("optim", "beta2", &c.optim.beta2, 0, 1);
    real("optim", "eps", &c.optim.eps, 0);
    real("optim", "muon_momentum", &c.optim.muon_momentum, 0, 1);
    real("optim", "muon_update_scale", &c.optim.muon_update_scale, 0);
    str("optim", "muon_ns_precision", &c.optim.muon_ns_precision, {"fp32", "bf16"});
    real("optim", "clip_grad_norm", &c.optim.clip_grad_norm, 0);
    // loss
    real("loss", "mtp_weight", &c.loss.mtp_weight, 0);
    real("loss", "mtp_weight_after_decay", &c.loss.mtp_weight_after_decay, 0);
    real("loss", "balance_alpha", &c.loss.balance_alpha, 0);
    real("loss", "bias_update_speed", &c.loss.bias_update_speed, 0);
    // train
    integer("train", "steps", &c.train.steps, 1);
    integer("train", "log_interval", &c.train.log_interval, 1);
    integer("train", "eval_interval", &c.train.eval_interval, 0);
    integer("train", "eval_batches", &c.train.eval_batches, 1);
    boolean("train", "recompute", &c.train.recompute);
    integer("train", "max_bad_steps", &c.train.max_bad_steps, 1);
    str("train", "out_dir", &c.train.out_dir);
    str("train", "resume", &c.train.resume);
    integer("train", "seed", &c.train.seed, 0);
    integer("train", "threads", &c.train.threads, 0);
    str("train", "precision", &c.train.precision, {"fp32", "bf16", "fp8"});
    str("train", "device", &c.train.device, {"cpu", "cuda"});
    str("train", "attention_precision", &c.train.attention_precision, {"fp32", "bf16"});
    // checkpoint
    integer("checkpoint", "interval", &c.checkpoint.interval, 0);
    integer("checkpoint", "keep", &c.checkpoint.keep, 1);
    // logging
    boolean("logging", "metrics_jsonl", &c.logging.metrics_jsonl);
    boolean("logging", "tensorboard", &c.logging.tensorboard);
    // lora
    boolean("lora", "enabled", &c.lora.enabled);
    integer("lora", "rank", &c.lora.rank, 1);
    real("lora", "alpha", &c.lora.alpha, 0);
    boolean("lora", "rslora", &c.lora.rslora);
    real("lora", "dropout", &c.lora.dropout, 0, 1);
    fields_.push_back({"lora", "targets", Kind::StringList, &c.lora.targets});
    boolean("lora", "moe_bias_update", &c.lora.moe_bias_update);
  }

  const std::vector<Field>& fields() const { return fields_; }
  const Field* find(const std::string& section, const std::string& key) const {
    for (const Field& f : fields_)
      if (f.section == section && f.key == key) return &f;
    return nullptr;
  }
  std::vector<std::string> sections() const {
    std::vector<std::string> s;
    for (const Field& f : fields_)
      if (std::find(s.begin(), s.end(), f.section) == s.end()) s.push_back(f.section);
    return s;
  }
  std::vector<std::string> keys(const std::string& section) const {
    std::vector<std::string> k;
    for (const Field& f : fields_)
      if (f.section == section) k.push_back(f.key);
    return k;
  }

 private:
  void str(const char* s, const char* k, std::string* p, std::vector<std::string> choices = {}) {
    Field f{s, k, Kind::String, p};
    f.choices = std::move(choices);
    fields_.push_back(std::move(f));
  }
  void boolean(const char* s, const char* k, bool* p) { fields_.push_back({s, k, Kind::Bool, p}); }
  void integer(const char* s, const char* k, int64_t* p, double min) { fields_.push_back({s, k, Kind::Int, p, min}); }
  void real(const char* s, const char* k, double* p, double min,
            double max = std::numeric_limits<double>::infinity()) {
    fields_.push_back({s, k, Kind::Double, p, min, max});
  }
  std::vector<Field> fields_;
};

std::string where(const std::string& source, const YAML::Node& node) {
  const YAML::Mark m = node.Mark();
  return m.line >= 0 ? fmt::format("{}:{}", source, m.line + 1) : source;
}

std::string hint(const std::string& word, const std::vector<std::string>& candidates) {
  const std::string c = closest_match(word, candidates);
  return c.empty() ? "" : fmt::format(" (did you mean '{}'?)", c);
}

void set_field(const Field& f, const YAML::Node& node, const std::string& at) {
  const std::string path = f.path();
  auto scalar = [&](const char* what) {
    DSV4_CHECK(node.IsScalar(), "{}: '{}' must be {}, got a {}", at, path, what, node.IsSequence() ? "list" : "map");
    return node.Scalar();
  };
  try {
    switch (f.kind) {
      case Kind::Bool: {
        const std::string s = scalar("true or false");
        bool v;
        DSV4_CHECK(YAML::convert<bool>::decode(node, v), "{}: '{}' must be true or false, got '{}'", at, path, s);
        *static_cast<bool*>(f.ptr) = v;
        break;
      }
      case Kind::Int: {
        const std::string s = scalar("an integer");
        int64_t v;
        DSV4_CHECK(YAML::convert<int64_t>::decode(node, v), "{}: '{}' must be an integer, got '{}'", at, path, s);
        DSV4_CHECK(static_cast<double>(v) >= f.min && static_cast<double>(v) <= f.max,
                   "{}: '{}' = {} is out of range (expected >= {})", at, path, v, f.min);
        *static_cast<int64_t*>(f.ptr) = v;
        break;
      }
      case Kind::Double: {
        const std::string s = scalar("a number");
        double v;
        DSV4_CHECK(YAML::convert<double>::decode(node, v) && std::isfinite(v), "{}: '{}' must be a number, got '{}'", at,
                   path, s);
        DSV4_CHECK(v >= f.min && v <= f.max, "{}: '{}' = {} is out of range [{}, {}]", at, path, v, f.min, f.max);
        *static_cast<double*>(f.ptr) = v;
        break;
      }
      case Kind::String: {
        const std::string s = node.IsNull() ? std::string() : scalar("a string");
        if (!f.choices.empty())
          DSV4_CHECK(std::find(f.choices.begin(), f.choices.end(), s) != f.choices.end(),
                     "{}: '{}' = '{}' is not one of [{}]{}", at, path, s, fmt::join(f.choices, ", "), hint(s, f.choices));
        *static_cast<std::string*>(f.ptr) = s;
        break;
      }
      case Kind::StringList:
      case Kind::DoubleList: {
        const bool strings = f.kind == Kind::StringList;
        std::vector<std::string> sv;
        std::vector<double> dv;
        auto add = [&](const YAML::Node& e) {
          DSV4_CHECK(e.IsScalar(), "{}: '{}' must be a list of {}", at, path, strings ? "strings" : "numbers");
          if (strings) {
            sv.push_back(e.Scalar());
          } else {
            double v;
            DSV4_CHECK(YAML::convert<double>::decode(e, v) && v >= f.min,
                       "{}: '{}' must be a list of numbers >= {}, found '{}'", at, path, f.min, e.Scalar());
            dv.push_back(v);
          }
        };
        if (node.IsSequence()) {
          for (const auto& e : node) add(e);
        } else if (!node.IsNull()) {
          add(node);  // a single value is a one-element list
        }
        if (strings) *static_cast<std::vector<std::string>*>(f.ptr) = sv;
        else *static_cast<std::vector<double>*>(f.ptr) = dv;
        break;
      }
    }
  } catch (const YAML::Exception& e) {
    DSV4_FAIL("{}: '{}': {}", at, path, e.msg);
  }
}

void cross_checks(const TrainConfig& c, const std::string& source) {
  const bool has_model = !c.model.preset.empty() || !c.model.config.empty() || !c.model.checkpoint.empty();
  DSV4_CHECK(has_model, "{}: set 'model.preset', 'model.config' or 'model.checkpoint'", source);
  DSV4_CHECK(c.model.preset.empty() || c.model.config.empty(),
             "{}: 'model.preset' and 'model.config' both set; choose one", source);
  DSV4_CHECK(!c.data.train.empty(), "{}: 'data.train' needs at least one HDF5 file (from dsv4-prep)", source);
  DSV4_CHECK(c.data.weights.empty() || c.data.weights.size() == c.data.train.size(),
             "{}: 'data.weights' has {} entries for {} 'data.train' files", source, c.data.weights.size(),
             c.data.train.size());
  DSV4_CHECK(c.optim.min_lr <= c.optim.lr, "{}: 'optim.min_lr' = {} exceeds 'optim.lr' = {}", source, c.optim.min_lr,
             c.optim.lr);
  DSV4_CHECK(c.optim.warmup_steps <= c.train.steps, "{}: 'optim.warmup_steps' = {} exceeds 'train.steps' = {}", source,
             c.optim.warmup_steps, c.train.steps);
  DSV4_CHECK(!c.train.out_dir.empty(), "{}: 'train.out_dir' must not be empty", source);
  DSV4_CHECK(c.train.attention_precision == "fp32" || c.train.device == "cuda",
             "{}: 'train.attention_precision' = {} needs 'train.device' = cuda (the CPU runs the FP32 attention)",
             source, c.train.attention_precision);
}

}  // namespace

std::string closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  auto distance = [](const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  };
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const std::string& c : candidates) {
    size_t d = distance(word, c);
    if (!word.empty() && !c.empty() && (c.rfind(word, 0) == 0 || word.rfind(c, 0) == 0)) d = std::min<size_t>(d, 1);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best_d <= std::max<size_t>(2, word.size() / 3) ? best : std::string();
}

TrainConfig parse_train_config(const std::string& yaml_text, const std::string& source,
                               const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    DSV4_FAIL("{}:{}: not valid YAML: {}", source, e.mark.line + 1, e.msg);
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  DSV4_CHECK(root.IsMap(), "{}: expected a map of sections (model, data, optim, ...) at the top level", source);
  TrainConfig cfg;
  Schema schema(cfg);
  const auto sections = schema.sections();

  // Command-line overrides "section.key=value" are applied to the tree first, then checked like the file.
  for (const std::string& o : overrides) {
    const size_t eq = o.find('='), dot = o.find('.');
    DSV4_CHECK(eq != std::string::npos && dot != std::string::npos && dot < eq,
               "override '{}': expected section.key=value", o);
    const std::string section = o.substr(0, dot), key = o.substr(dot + 1, eq - dot - 1), value = o.substr(eq + 1);
    DSV4_CHECK(schema.find(section, key) != nullptr, "override '{}': unknown key '{}.{}'{}", o, section, key,
               hint(section + "." + key, [&] {
                 std::vector<std::string> all;
                 for (const Field& f : schema.fields()) all.push_back(f.path());
                 return all;
               }()));
    YAML::Node v;
    try {
      v = YAML::Load(value);
    } catch (const YAML::Exception& e) {
      DSV4_FAIL("override '{}': value is not valid YAML: {}", o, e.msg);
    }
    root[section][key] = v;
  }

  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string section = it->first.as<std::string>();
    DSV4_CHECK(std::find(sections.begin(), sections.end(), section) != sections.end(), "{}: unknown section '{}'{}",
               where(source, it->first), section, hint(section, sections));
    const YAML::Node& body = it->second;
    if (body.IsNull()) continue;
    DSV4_CHECK(body.IsMap(), "{}: section '{}' must be a map of keys", where(source, it->first), section);
    const auto keys = schema.keys(section);
    for (auto kv = body.begin(); kv != body.end(); ++kv) {
      const std::string key = kv->first.as<std::string>();
      const Field* f = schema.find(section, key);
      DSV4_CHECK(f != nullptr, "{}: unknown key '{}.{}'{}", where(source, kv->first), section, key, hint(key, keys));
      set_field(*f, kv->second, where(source, kv->second));
    }
  }
  cross_checks(cfg, source);
  return cfg;
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  DSV4_CHECK(in.good(), "cannot open config '{}'", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_train_config(ss.str(), path, overrides);
}

std::string TrainConfig::to_yaml() const {
  TrainConfig copy = *this;
  Schema schema(copy);
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::string current;
  for (const Field& f : schema.fields()) {
    if (f.section != current) {
      if (!current.empty()) out << YAML::EndMap;
      current = f.section;
      out << YAML::Key << current << YAML::Value << YAML::BeginMap;
    }
    out << YAML::Key << f.key << YAML::Value;
    switch (f.kind) {
      case Kind::Bool: out << *static_cast<bool*>(f.ptr); break;
      case Kind::Int: out << *static_cast<int64_t*>(f.ptr); break;
      case Kind::Double: out << fmt::format("{}", *static_cast<double*>(f.ptr)); break;
      case Kind::String: out << YAML::DoubleQuoted << *static_cast<std::string*>(f.ptr); break;
      case Kind::StringList: out << YAML::Flow << *static_cast<std::vector<std::string>*>(f.ptr); break;
      case Kind::DoubleList: out << YAML::Flow << *static_cast<std::vector<double>*>(f.ptr); break;
    }
  }
  if (!current.empty()) out << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace dsv4
