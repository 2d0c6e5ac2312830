// Layout-independent training state on disk: the tensors of one logical state dict ("model" or "optimizer") spread
// over per-rank safetensors files, each tensor stored as a slice with its global shape and offset, so a checkpoint
// written under one parallel layout loads under any other (dp2·tp2·ep2 -> dp1·tp1·ep4 ...).
//
//   <stem>.safetensors                          one-rank runs (whole tensors, no shard metadata)
//   <stem>-rank<RRRRR>-of-<WWWWW>.safetensors   parallel runs; metadata "dsv4.shards" = JSON {name: {"dim": d,
//                                               "offset": o, "global": [..]}} for each tensor that is a slice
// A tensor name may appear in several files as slices along one dim; readers copy the overlaps they need and fail
// naming the tensor when a requested range is not covered.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/safetensors.h"
#include "runtime/tensor.h"

namespace dsv4 {

struct StateSlice {
  std::string name;
  Tensor value;     // the slice (or whole tensor)
  int dim = -1;     // -1: whole tensor
  int64_t offset = 0;
  Shape global;     // global shape (= value.shape() when whole)
};

// Writes this rank's slices. world == 1 writes <stem>.safetensors.
void write_state_slices(const std::string& dir, const std::string& stem, int64_t rank, int64_t world,
                        const std::vector<StateSlice>& slices, const std::map<std::string, std::string>& metadata = {});

class ShardedState {
 public:
  // Opens <stem>.safetensors or every <stem>-rank*-of-*.safetensors in dir (all of one world size); throws naming
  // the directory when there are none or the set is incomplete.
  static ShardedState open(const std::string& dir, const std::string& stem);

  bool contains(const std::string& name) const { return pieces_.count(name) != 0; }
  Shape global_shape(const std::string& name) const;  // throws naming the tensor
  DType dtype(const std::string& name) const;
  std::vector<std::string> names() const;
  // Fills out with [offset, offset + out.size(dim)) of the global tensor along dim (dim -1: the whole tensor). The
  // global shape must agree with out's on every other dim. Throws naming the tensor and the uncovered range.
  void read_into(const std::string& name, Tensor& out, int dim = -1, int64_t offset = 0) const;
  // The whole global tensor (assembled).
  Tensor read(const std::string& name) const;
  const std::string& where() const { return where_; }
  // Metadata of the first file (writers put run-level facts there).
  const std::map<std::string, std::string>& metadata() const;

 private:
  struct Piece {
    size_t file = 0;
    int dim = -1;
    int64_t offset = 0;
  };
  std::string where_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::vector<Piece>> pieces_;
  std::map<std::string, Shape> global_;
};

}  // namespace dsv4
