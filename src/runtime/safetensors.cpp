#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace dsv4 {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kMaxHeaderBytes = 100 << 20;  // the reference library's bound

// safetensors dtype names that map onto ours (packed FP4 travels as I8).
bool dtype_from_safetensors(const std::string& s, DType& out) {
  static const std::pair<const char*, DType> table[] = {
      {"F32", DType::F32},         {"BF16", DType::BF16}, {"F16", DType::F16}, {"F8_E4M3", DType::F8_E4M3},
      {"F8_E8M0", DType::F8_E8M0}, {"I8", DType::I8},     {"U8", DType::U8},   {"I32", DType::I32},
      {"I64", DType::I64}};
  for (const auto& [name, t] : table)
    if (s == name) {
      out = t;
      return true;
    }
  return false;
}

const char* dtype_to_safetensors(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E8M0: return "F8_E8M0";
    case DType::F4_E2M1: return "I8";  // packed, last dim halved
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

std::string errno_text() { return std::strerror(errno); }

// A file written under a temporary name and renamed over the target only by commit().
class AtomicWriter {
 public:
  explicit AtomicWriter(const std::string& path) : path_(path) {
    const fs::path p(path);
    const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
    DSV4_CHECK(fs::is_directory(dir), "cannot write '{}': directory '{}' does not exist", path, dir.string());
    tmp_ = (dir / (".tmp." + p.filename().string() + "." + std::to_string(::getpid()))).string();
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    DSV4_CHECK(fd_ >= 0, "cannot create '{}': {}", tmp_, errno_text());
  }
  ~AtomicWriter() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, std::min<size_t>(n, size_t{1} << 30));
      if (w < 0 && errno == EINTR) continue;
      DSV4_CHECK(w > 0, "writing '{}' failed: {}", tmp_, errno_text());
      p += w;
      n -= static_cast<size_t>(w);
    }
  }
  void commit() {
    DSV4_CHECK(::fsync(fd_) == 0, "fsync of '{}' failed: {}", tmp_, errno_text());
    DSV4_CHECK(::close(fd_) == 0, "closing '{}' failed: {}", tmp_, errno_text());
    fd_ = -1;
    DSV4_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, "renaming '{}' to '{}' failed: {}", tmp_, path_,
               errno_text());
    committed_ = true;
    const fs::path dir = fs::path(path_).has_parent_path() ? fs::path(path_).parent_path() : fs::path(".");
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {  // make the rename durable
      ::fsync(dfd);
      ::close(dfd);
    }
  }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

// ---- reading -----------------------------------------------------------------------------------------
struct SafetensorsFile::Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base && size) ::munmap(base, size);
  }
};

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY);
  DSV4_CHECK(fd >= 0, "cannot open safetensors file '{}': {}", path, errno_text());
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    DSV4_FAIL("cannot stat '{}': {}", path, errno_text());
  }
  const int64_t size = st.st_size;
  if (size < 8) {
    ::close(fd);
    DSV4_FAIL("'{}' is not a safetensors file: {} bytes, shorter than the 8-byte header length", path, size);
  }
  auto map = std::make_shared<Mapping>();
  map->base = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  DSV4_CHECK(map->base != MAP_FAILED, "cannot memory-map '{}': {}", path, errno_text());
  map->size = static_cast<size_t>(size);
  f.map_ = map;
  const auto* bytes = static_cast<const uint8_t*>(map->base);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  DSV4_CHECK(header_len <= static_cast<uint64_t>(kMaxHeaderBytes), "'{}': header length {} exceeds the {} byte limit",
             path, header_len, kMaxHeaderBytes);
  DSV4_CHECK(static_cast<int64_t>(header_len) <= size - 8, "'{}': header length {} runs past the end of the file ({} bytes)",
             path, header_len, size);
  f.data_start_ = 8 + static_cast<int64_t>(header_len);
  const int64_t data_size = size - f.data_start_;

  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(bytes + 8), reinterpret_cast<const char*>(bytes + f.data_start_));
  } catch (const json::parse_error& e) {
    DSV4_FAIL("'{}': header is not valid JSON: {}", path, e.what());
  }
  DSV4_CHECK(header.is_object(), "'{}': header must be a JSON object", path);

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      DSV4_CHECK(v.is_object(), "'{}': __metadata__ must be an object of strings", path);
      for (auto m = v.begin(); m != v.end(); ++m) {
        DSV4_CHECK(m.value().is_string(), "'{}': __metadata__ value of '{}' is not a string", path, m.key());
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    DSV4_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
               "'{}': tensor '{}' needs dtype, shape and data_offsets", path, name);
    SafetensorsEntry e;
    e.name = name;
    const json& dt = v["dtype"];
    DSV4_CHECK(dt.is_string() && dtype_from_safetensors(dt.get<std::string>(), e.dtype),
               "'{}': tensor '{}' has unsupported dtype {} (expected F32, BF16, F16, F8_E4M3, F8_E8M0, I8, U8, I32, I64)",
               path, name, dt.dump());
    const json& shape = v["shape"];
    DSV4_CHECK(shape.is_array() && shape.size() <= static_cast<size_t>(kMaxDims),
               "'{}': tensor '{}' shape {} must be a list of at most {} dims", path, name, shape.dump(), kMaxDims);
    for (const json& d : shape) {
      DSV4_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, "'{}': tensor '{}' has a bad dim in shape {}", path,
                 name, shape.dump());
      e.shape.push_back(d.get<int64_t>());
    }
    const json& off = v["data_offsets"];
    DSV4_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_integer() && off[1].is_number_integer(),
               "'{}': tensor '{}' data_offsets {} must be [begin, end]", path, name, off.dump());
    e.begin = off[0].get<int64_t>();
    e.end = off[1].get<int64_t>();
    DSV4_CHECK(0 <= e.begin && e.begin <= e.end && e.end <= data_size,
               "'{}': tensor '{}' byte range [{}, {}) lies outside the {}-byte data section", path, name, e.begin, e.end,
               data_size);
    const int64_t expected = dtype_nbytes(e.dtype, e.shape.numel());
    DSV4_CHECK(e.end - e.begin == expected, "'{}': tensor '{}' {}{} needs {} bytes but data_offsets span {}", path, name,
               dtype_name(e.dtype), e.shape.str(), expected, e.end - e.begin);
    f.entries_.push_back(std::move(e));
  }
  std::sort(f.entries_.begin(), f.entries_.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.begin < b.begin || (a.begin == b.begin && a.end < b.end); });
  int64_t cursor = 0;
  for (const SafetensorsEntry& e : f.entries_) {
    DSV4_CHECK(e.begin >= cursor, "'{}': tensor '{}' bytes [{}, {}) overlap the previous tensor (ends at {})", path,
               e.name, e.begin, e.end, cursor);
    DSV4_CHECK(e.begin == cursor, "'{}': hole in the data section before tensor '{}' (bytes [{}, {}))", path, e.name,
               cursor, e.begin);
    cursor = e.end;
  }
  DSV4_CHECK(cursor == data_size, "'{}': {} trailing bytes after the last tensor", path, data_size - cursor);
  for (size_t i = 0; i < f.entries_.size(); ++i) f.index_[f.entries_[i].name] = i;
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& e : entries_) out.push_back(e.name);
  return out;
}

int64_t SafetensorsFile::file_size() const { return static_cast<int64_t>(map_->size); }

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  DSV4_CHECK(it != index_.end(), "'{}': no tensor named '{}'", path_, name);
  return entries_[it->second];
}

Tensor SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  auto* p = static_cast<uint8_t*>(map_->base) + data_start_ + e.begin;
  const size_t align = static_cast<size_t>(std::max(1, dtype_bits(e.dtype) / 8));
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {  // unaligned in the file: hand out an aligned copy
    Tensor t = Tensor::empty(e.shape, e.dtype);
    std::memcpy(t.raw_data(), p, static_cast<size_t>(e.end - e.begin));
    return t;
  }
  return Tensor::from_blob(p, e.shape, e.dtype, Device::cpu(), map_);
}

Tensor as_packed_fp4(const Tensor& bytes) {
  DSV4_CHECK(bytes.dtype() == DType::I8 || bytes.dtype() == DType::U8, "as_packed_fp4: expected I8/U8 bytes, got {}",
             bytes.str());
  DSV4_CHECK(bytes.is_contiguous() && bytes.ndim() >= 1, "as_packed_fp4: expected a contiguous tensor, got {}",
             bytes.str());
  Shape logical = bytes.shape();
  logical[logical.ndim() - 1] *= 2;
  // Same storage, same byte offset: rebuild through from_blob keeping the storage alive.
  return Tensor::from_blob(bytes.raw_data(), logical, DType::F4_E2M1, bytes.device(), bytes.storage());
}

// ---- writing -----------------------------------------------------------------------------------------
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<Tensor> host;
  json header = json::object();
  int64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    DSV4_CHECK(t.defined(), "write_safetensors('{}'): tensor '{}' is undefined", path, name);
    DSV4_CHECK(name != "__metadata__" && !header.contains(name), "write_safetensors('{}'): duplicate or reserved name '{}'",
               path, name);
    Tensor h = t.to(Device::cpu()).contiguous();
    Shape shape = h.shape();
    if (h.dtype() == DType::F4_E2M1) shape[shape.ndim() - 1] /= 2;
    const int64_t n = h.nbytes();
    header[name] = {{"dtype", dtype_to_safetensors(h.dtype())}, {"shape", shape.vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    host.push_back(std::move(h));
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data section 8-byte aligned
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  AtomicWriter w(path);
  w.write(len, 8);
  w.write(text.data(), text.size());
  for (const Tensor& h : host) w.write(h.raw_data(), static_cast<size_t>(h.nbytes()));
  w.commit();
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  AtomicWriter w(path);
  w.write(bytes.data(), bytes.size());
  w.commit();
}

void write_safetensors_index(const std::string& path, const std::map<std::string, std::string>& weight_map,
                             int64_t total_size, const std::map<std::string, std::string>& extra_metadata) {
  json meta = json::object();
  for (const auto& [k, v] : extra_metadata) meta[k] = v;
  meta["total_size"] = total_size;
  const json index = {{"metadata", meta}, {"weight_map", weight_map}};
  write_file_atomic(path, index.dump(2) + "\n");
}

// ---- checkpoints (single file or sharded) -------------------------------------------------------------
SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& path) {
  SafetensorsCheckpoint c;
  fs::path p(path);
  DSV4_CHECK(fs::exists(p), "checkpoint path '{}' does not exist", path);
  if (fs::is_directory(p)) {
    if (fs::exists(p / "model.safetensors.index.json")) p = p / "model.safetensors.index.json";
    else if (fs::exists(p / "model.safetensors")) p = p / "model.safetensors";
    else DSV4_FAIL("checkpoint directory '{}' has neither model.safetensors.index.json nor model.safetensors", path);
  }
  c.dir_ = p.has_parent_path() ? p.parent_path().string() : ".";
  if (p.extension() == ".json") {
    c.index_path_ = p.string();
    std::ifstream in(p);
    DSV4_CHECK(in.good(), "cannot read index '{}'", c.index_path_);
    std::stringstream ss;
    ss << in.rdbuf();
    json index;
    try {
      index = json::parse(ss.str());
    } catch (const json::parse_error& e) {
      DSV4_FAIL("'{}': not valid JSON: {}", c.index_path_, e.what());
    }
    DSV4_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
               "'{}': expected an object with a 'weight_map' object", c.index_path_);
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      DSV4_CHECK(it.value().is_string(), "'{}': weight_map entry '{}' must name a file", c.index_path_, it.key());
      c.weight_map_[it.key()] = it.value().get<std::string>();
    }
    if (index.contains("metadata") && index["metadata"].is_object())
      for (auto it = index["metadata"].begin(); it != index["metadata"].end(); ++it)
        c.index_metadata_[it.key()] = it.value().is_string() ? it.value().get<std::string>() : it.value().dump();
    std::vector<std::string> missing;
    for (const auto& [name, file] : c.weight_map_)
      if (!fs::exists(fs::path(c.dir_) / file) &&
          std::find(missing.begin(), missing.end(), file) == missing.end())
        missing.push_back(file);
    DSV4_CHECK(missing.empty(), "'{}': shard file(s) missing from '{}': {}", c.index_path_, c.dir_,
               fmt::join(missing, ", "));
  } else {
    c.index_path_ = p.string();
    const std::string file = p.filename().string();
    auto f = std::make_unique<SafetensorsFile>(SafetensorsFile::open(p.string()));
    for (const std::string& name : f->names()) c.weight_map_[name] = file;
    c.shards_[file] = std::move(f);
  }
  return c;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : weight_map_) out.push_back(name);
  return out;
}

const std::string& SafetensorsCheckpoint::file_of(const std::string& name) const {
  auto it = weight_map_.find(name);
  DSV4_CHECK(it != weight_map_.end(), "checkpoint '{}' has no tensor '{}'", index_path_, name);
  return it->second;
}

const SafetensorsFile& SafetensorsCheckpoint::shard(const std::string& file) const {
  auto it = shards_.find(file);
  if (it != shards_.end()) return *it->second;
  auto f = std::make_unique<SafetensorsFile>(SafetensorsFile::open((fs::path(dir_) / file).string()));
  for (const auto& [name, mapped] : weight_map_)
    DSV4_CHECK(mapped != file || f->contains(name), "'{}' lists tensor '{}' in shard '{}', which does not contain it",
               index_path_, name, file);
  return *shards_.emplace(file, std::move(f)).first->second;
}

void SafetensorsCheckpoint::release_shards() const { shards_.clear(); }

}  // namespace dsv4
