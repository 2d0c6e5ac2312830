// dsv4-train CONFIG.yaml [section.key=value ...]
// Trains (pre-training, continued pre-training, SFT) a DeepSeek-V4 model as the config says. Errors are one line
// naming the file and key; the exit code is non-zero; checkpoints already written are never touched by a failure.
#include <mpi.h>

#include <cstdio>
#include <optional>
#include <cstdlib>
#include <string>
#include <vector>

#include "runtime/build_info.h"
#include "runtime/comm.h"
#include "runtime/error.h"
#include "train/data_source.h"
#include "model/exec_path.h"
#include "train/trainer.h"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: dsv4-train CONFIG.yaml [section.key=value ...]\n"
               "  e.g. dsv4-train configs/tiny-pretrain.yaml train.steps=50 optim.lr=1e-3\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") return usage();
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  int rc = 0;
  try {
    const std::string path = argv[1];
    std::vector<std::string> overrides(argv + 2, argv + argc);
    dsv4::TrainConfig cfg = dsv4::load_train_config(path, overrides);
    const dsv4::ModelConfig model = dsv4::resolve_model_config(cfg);
    // The layout (dp fills the ranks tp leaves: mpirun -np N with no parallel section is N-way data parallel).
    dsv4::ParallelDims dims;
    try {
      dims = dsv4::resolve_layout(cfg, model, world);
    } catch (const dsv4::Error& e) {
      DSV4_FAIL("{}: parallel section: {}", path, e.message());
    }
    cfg.parallel.dp = dims.dp;
    if (rank == 0) std::printf("%s\nresolved config (%s):\n%s", dsv4::build_info().c_str(), path.c_str(),
                               cfg.to_yaml().c_str());
    dsv4::Trainer::install_signal_handlers();
    // DSV4_OPS_PATH=1: CPU tensors take every module's tensor-op path (model/exec_path.h), the code a GPU run
    // executes, with the same collectives: a debugging and testing knob (tests/e2e/train_layouts.sh).
    std::optional<dsv4::ForceOpsPath> ops_path;
    if (const char* v = std::getenv("DSV4_OPS_PATH"); v && std::string(v) == "1") ops_path.emplace();
    const std::unique_ptr<dsv4::Communicator> comm = dsv4::mpi_world();
    // Each dp rank reads its own rows; the tp ranks of one dp rank read the same.
    const int dp_rank = static_cast<int>(rank / dims.tp), dp_size = static_cast<int>(dims.dp);
    dsv4::Trainer trainer(cfg, dsv4::make_train_source(cfg, model, dp_rank, dp_size),
                          dsv4::make_val_source(cfg, model, dp_rank, dp_size), comm.get());
    trainer.run();
  } catch (const dsv4::Error& e) {
    if (world > 1) std::fprintf(stderr, "dsv4-train: rank %d of %d: error: %s\n", rank, world, e.message().c_str());
    else std::fprintf(stderr, "dsv4-train: error: %s\n", e.message().c_str());
    rc = 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4-train: rank %d of %d: error: %s\n", rank, world, e.what());
    rc = 1;
  }
  if (rc != 0 && world > 1) MPI_Abort(MPI_COMM_WORLD, rc);  // take the whole job down instead of hanging
  MPI_Finalize();
  return rc;
}
