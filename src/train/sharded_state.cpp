#include "train/sharded_state.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>

#include "runtime/error.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace fs = std::filesystem;

namespace {
constexpr const char* kShardsKey = "dsv4.shards";

std::string rank_file(const std::string& stem, int64_t rank, int64_t world) {
  return fmt::format("{}-rank{:05d}-of-{:05d}.safetensors", stem, rank, world);
}
}  // namespace

void write_state_slices(const std::string& dir, const std::string& stem, int64_t rank, int64_t world,
                        const std::vector<StateSlice>& slices, const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  nlohmann::json shards = nlohmann::json::object();
  for (const StateSlice& s : slices) {
    tensors.emplace_back(s.name, s.value);
    if (s.dim >= 0) {
      DSV4_CHECK(world > 1, "{}: a slice in a one-rank state", s.name);
      shards[s.name] = {{"dim", s.dim}, {"offset", s.offset}, {"global", s.global.vec()}};
    }
  }
  std::map<std::string, std::string> meta = metadata;
  if (world > 1) meta[kShardsKey] = shards.dump();
  const std::string file = world > 1 ? rank_file(stem, rank, world) : stem + ".safetensors";
  write_safetensors((fs::path(dir) / file).string(), tensors, meta);
}

ShardedState ShardedState::open(const std::string& dir, const std::string& stem) {
  ShardedState st;
  st.where_ = (fs::path(dir) / (stem + "*.safetensors")).string();
  std::vector<std::string> paths;
  const fs::path single = fs::path(dir) / (stem + ".safetensors");
  if (fs::exists(single)) {
    paths.push_back(single.string());
  } else if (fs::is_directory(dir)) {
    const std::regex re(stem + R"(-rank(\d{5})-of-(\d{5})\.safetensors)");
    int64_t world = -1;
    std::vector<bool> seen;
    for (const auto& e : fs::directory_iterator(dir)) {
      std::smatch m;
      const std::string name = e.path().filename().string();
      if (!std::regex_match(name, m, re)) continue;
      const int64_t r = std::stoll(m[1]), w = std::stoll(m[2]);
      DSV4_CHECK(world < 0 || w == world, "{}: rank files of two world sizes ({} and {})", dir, world, w);
      world = w;
      seen.resize(static_cast<size_t>(w), false);
      DSV4_CHECK(r < w, "{}: {} names rank {} of {}", dir, name, r, w);
      seen[static_cast<size_t>(r)] = true;
    }
    DSV4_CHECK(world > 0, "{}: no {}.safetensors or {}-rank*-of-*.safetensors", dir, stem, stem);
    for (int64_t r = 0; r < world; ++r) {
      DSV4_CHECK(seen[static_cast<size_t>(r)], "{}: {} is missing (the state of a {}-rank run is incomplete)", dir,
                 rank_file(stem, r, world), world);
      paths.push_back((fs::path(dir) / rank_file(stem, r, world)).string());
    }
  } else {
    DSV4_FAIL("{}: no such directory", dir);
  }
  for (size_t f = 0; f < paths.size(); ++f) {
    st.files_.push_back(std::make_shared<SafetensorsFile>(SafetensorsFile::open(paths[f])));
    const SafetensorsFile& file = *st.files_.back();
    nlohmann::json shards = nlohmann::json::object();
    const auto it = file.metadata().find(kShardsKey);
    if (it != file.metadata().end()) {
      try {
        shards = nlohmann::json::parse(it->second);
      } catch (const nlohmann::json::exception& e) {
        DSV4_FAIL("{}: bad {} metadata: {}", paths[f], kShardsKey, e.what());
      }
    }
    for (const SafetensorsEntry& e : file.entries()) {
      Piece p;
      p.file = f;
      Shape global = e.shape;
      if (shards.contains(e.name)) {
        const auto& j = shards[e.name];
        p.dim = j.at("dim").get<int>();
        p.offset = j.at("offset").get<int64_t>();
        global = Shape(j.at("global").get<std::vector<int64_t>>());
        DSV4_CHECK(p.dim >= 0 && p.dim < global.ndim() && global.ndim() == e.shape.ndim() &&
                       p.offset + e.shape[p.dim] <= global[p.dim],
                   "{}: {} slice [{}, +{}) of dim {} does not fit its global shape {}", paths[f], e.name, p.offset,
                   e.shape[p.dim], p.dim, global.str());
      }
      const auto g = st.global_.find(e.name);
      DSV4_CHECK(g == st.global_.end() || g->second == global, "{}: {} has global shape {} here and {} elsewhere",
                 paths[f], e.name, global.str(), g == st.global_.end() ? "" : g->second.str());
      st.global_[e.name] = global;
      st.pieces_[e.name].push_back(p);
    }
  }
  return st;
}

Shape ShardedState::global_shape(const std::string& name) const {
  const auto it = global_.find(name);
  DSV4_CHECK(it != global_.end(), "{}: no tensor {}", where_, name);
  return it->second;
}

DType ShardedState::dtype(const std::string& name) const {
  const auto it = pieces_.find(name);
  DSV4_CHECK(it != pieces_.end(), "{}: no tensor {}", where_, name);
  return files_[it->second.front().file]->entry(name).dtype;
}

std::vector<std::string> ShardedState::names() const {
  std::vector<std::string> out;
  for (const auto& [n, p] : pieces_) out.push_back(n);
  return out;
}

const std::map<std::string, std::string>& ShardedState::metadata() const { return files_.front()->metadata(); }

void ShardedState::read_into(const std::string& name, Tensor& out, int dim, int64_t offset) const {
  const Shape global = global_shape(name);
  Shape want = global;
  if (dim >= 0) {
    DSV4_CHECK(dim < global.ndim(), "{}: {} has no dim {}", where_, name, dim);
    want[dim] = out.size(dim);
  }
  DSV4_CHECK(out.shape() == want, "{}: {} is {} globally; cannot fill {} from offset {} of dim {}", where_, name,
             global.str(), out.shape().str(), offset, dim);
  const int64_t lo = dim >= 0 ? offset : 0, hi = dim >= 0 ? offset + out.size(dim) : 0;
  int64_t covered = 0;
  for (const Piece& p : pieces_.at(name)) {
    const Tensor v = files_[p.file]->view(name);
    if (p.dim < 0) {  // a whole tensor: take what is asked for
      Tensor src = dim >= 0 ? v.slice(dim, lo, hi) : v;
      ops::copy(src, out);
      return;
    }
    if (dim >= 0 && dim != p.dim) continue;  // slices along another dim: handled below when nothing else covers
    const int64_t plo = p.offset, phi = p.offset + v.size(p.dim);
    const int64_t a = dim >= 0 ? std::max(lo, plo) : plo, b = dim >= 0 ? std::min(hi, phi) : phi;
    if (a >= b) continue;
    Tensor dst = dim >= 0 ? out.slice(dim, a - lo, b - lo) : out.slice(p.dim, a, b);
    ops::copy(v.slice(p.dim, a - plo, b - plo), dst);
    covered += b - a;
  }
  const int64_t need = dim >= 0 ? hi - lo : global[pieces_.at(name).front().dim < 0 ? 0 : pieces_.at(name).front().dim];
  DSV4_CHECK(covered == need, "{}: {} pieces cover {} of the {} entries requested (overlapping or missing slices)",
             where_, name, covered, need);
}

Tensor ShardedState::read(const std::string& name) const {
  Tensor out = Tensor::empty(global_shape(name), dtype(name));
  read_into(name, out);
  return out;
}

}  // namespace dsv4
