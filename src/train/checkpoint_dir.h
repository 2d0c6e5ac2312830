// Training checkpoints on disk: out_dir/checkpoints/step_<N>/ with every file's CRC-32C in checksums.json.
// A checkpoint is written into a temporary directory, checksummed, fsynced and renamed into place; the
// `latest` pointer (a small file holding the directory name) moves last, atomically; older checkpoints are
// pruned to a keep count. A crash at any point leaves the previous `latest` complete and loadable.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace dsv4 {

class CheckpointDir {
 public:
  explicit CheckpointDir(std::string root);  // created if missing; stale temporary directories are removed

  // Calls write(tmp_dir) to fill a fresh temporary directory, then commits it as step_<step>. Returns the
  // final path. An exception from `write` removes the temporary directory and propagates.
  std::string save(int64_t step, const std::function<void(const std::string& tmp_dir)>& write, int64_t keep);

  // The checkpoint `latest` points to (nullopt when there is none).
  std::optional<std::string> latest() const;
  // Checks every file against checksums.json; throws naming the checkpoint and the file that differs.
  static void verify(const std::string& checkpoint);
  // Steps of the complete checkpoints present, ascending.
  std::vector<int64_t> steps() const;
  const std::string& root() const { return root_; }

 private:
  std::string root_;
};

}  // namespace dsv4
