// safetensors I/O (https://github.com/huggingface/safetensors format): an 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
//
// Reading memory-maps the file and validates the whole header before any tensor is used: header length bound,
// well-formed JSON, known dtypes, shapes, byte ranges inside the file, sorted without overlap or holes (as the
// reference library requires), and size = product(shape) x dtype size. Every error names the file and tensor.
// Packed FP4 is stored as I8 with the last dim halved (the DeepSeek release convention): read it as I8 and
// reinterpret with as_packed_fp4(); writing an F4_E2M1 tensor stores it that way.
// Writing is atomic: a temporary file in the same directory, fsync, then rename over the target.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace dsv4 {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  int64_t begin = 0;  // byte offsets relative to the start of the data section
  int64_t end = 0;
};

class SafetensorsFile {
 public:
  // Maps and validates `path`. Throws dsv4::Error naming the file (and the tensor) on any problem.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }  // in data order
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;  // throws naming file and tensor
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  int64_t file_size() const;

  // Zero-copy read-only CPU tensor over the mapping (keeps the mapping alive). Do not write through it.
  Tensor view(const std::string& name) const;
  // An owned CPU copy.
  Tensor load(const std::string& name) const { return view(name).clone(); }

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<const Mapping> map_;
  int64_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Reinterprets an I8/U8 tensor [..., n/2] holding packed FP4 as an F4_E2M1 tensor [..., n] (no copy).
Tensor as_packed_fp4(const Tensor& bytes);

// Writes tensors (CPU or any device; copied to the host as needed) atomically to `path`.
// Tensors are stored in the order given; names must be unique and not "__metadata__".
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A checkpoint made of one file or of shards listed in model.safetensors.index.json
// ({"metadata": {...}, "weight_map": {tensor: file}}). Shards are opened lazily.
class SafetensorsCheckpoint {
 public:
  // `path` is a directory (model.safetensors.index.json or model.safetensors inside), an index file, or a
  // single .safetensors file.
  static SafetensorsCheckpoint open(const std::string& path);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return weight_map_.count(name) != 0; }
  const std::string& file_of(const std::string& name) const;  // throws naming the index and tensor
  const SafetensorsFile& shard(const std::string& file) const;
  const SafetensorsEntry& entry(const std::string& name) const { return shard(file_of(name)).entry(name); }
  Tensor view(const std::string& name) const { return shard(file_of(name)).view(name); }
  Tensor load(const std::string& name) const { return shard(file_of(name)).load(name); }
  const std::map<std::string, std::string>& index_metadata() const { return index_metadata_; }
  // Closes shard mappings not referenced by live tensors (bounds memory while streaming shard by shard).
  void release_shards() const;

 private:
  std::string dir_;
  std::string index_path_;
  std::map<std::string, std::string> weight_map_;  // tensor -> shard file name (relative to dir_)
  std::map<std::string, std::string> index_metadata_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

// Writes model.safetensors.index.json atomically: weight_map and metadata.total_size (sum of tensor bytes).
void write_safetensors_index(const std::string& path, const std::map<std::string, std::string>& weight_map,
                             int64_t total_size, const std::map<std::string, std::string>& extra_metadata = {});

// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename, fsync dir).
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace dsv4
