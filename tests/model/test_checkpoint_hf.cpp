// Peer checks with Hugging Face transformers 5.23 (fixtures written by tests/ref/ckpt/check_hf_load.py):
//  * a transformers-layout checkpoint written by dsv4 (make_tiny_checkpoint, as `dsv4-make-tiny --preset tiny
//    --seed 1 --format hf --std 0.25 --full-random`) gives in dsv4 the logits transformers computed from it;
//  * a checkpoint written by transformers' save_pretrained loads in dsv4 and gives transformers' logits.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "model/checkpoint_io.h"
#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

const std::string kDir = std::string(DSV4_FIXTURE_DIR) + "/ckpt";

struct Reference {
  Tensor ids;     // I64 [B*S]
  SeqLayout layout{1, 1};
  std::vector<float> logits;
};

Reference read_reference(const std::string& file) {
  const SafetensorsFile f = SafetensorsFile::open(kDir + "/" + file);
  Reference r;
  const Tensor ids = f.load("input_ids");
  r.layout = SeqLayout(ids.size(0), ids.size(1));
  r.ids = ids.view({ids.numel()});
  r.logits = f.load("logits").to_floats();
  return r;
}

double max_abs_err(const Model& m, const Reference& ref) {
  const auto got = m.forward(ref.ids, ref.layout, nullptr).logits_TV.to_floats();
  EXPECT_EQ(got.size(), ref.logits.size());
  double e = 0;
  for (size_t i = 0; i < got.size() && i < ref.logits.size(); ++i)
    e = std::max(e, std::abs(static_cast<double>(got[i]) - ref.logits[i]));
  return e;
}

struct TmpDir {
  fs::path path = fs::temp_directory_path() / fmt::format("dsv4_ckpt_hf_{}", ::getpid());
  TmpDir() { fs::remove_all(path); }
  ~TmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

TEST(CheckpointHf, Dsv4WrittenCheckpointMatchesTransformersLogits) {
  const Reference ref = read_reference("dsv4_tiny_hf_logits.safetensors");
  TmpDir d;
  MakeTinyOptions o;
  o.preset = "tiny";
  o.seed = 1;
  o.stddev = 0.25;
  o.full_random = true;
  o.layout = CheckpointLayout::Transformers;
  o.quant = "none";
  make_tiny_checkpoint(d.path.string(), o);
  LoadReport r;
  auto m = load_model(d.path.string(), {}, {}, &r);
  EXPECT_EQ(r.layout, CheckpointLayout::Transformers);
  const double err = max_abs_err(*m, ref);
  EXPECT_LE(err, 1e-4) << "dsv4 vs transformers logits on the dsv4-written checkpoint (if make_tiny_checkpoint or "
                          "Model::init_random changed on purpose, regenerate with tests/ref/ckpt/check_hf_load.py)";
  std::printf("[peer dsv4 -> transformers] logits max abs err %.3g\n", err);
  // The same model read with frozen weights: the same logits.
  LoadOptions lo;
  lo.mode = LoadMode::FrozenQuantized;
  EXPECT_LE(max_abs_err(*load_model(d.path.string(), lo), ref), 1e-4);
}

TEST(CheckpointHf, TransformersSavedCheckpointLoads) {
  const Reference ref = read_reference("hf_saved_tiny.logits.safetensors");
  LoadReport r;
  auto m = load_model(kDir + "/hf_saved_tiny", {}, {}, &r);
  EXPECT_EQ(r.layout, CheckpointLayout::Transformers);
  EXPECT_TRUE(r.not_in_checkpoint.empty());  // num_nextn_predict_layers = 0: no MTP to miss
  const double err = max_abs_err(*m, ref);
  EXPECT_LE(err, 1e-4);
  std::printf("[peer transformers -> dsv4] logits max abs err %.3g\n", err);
  // Written again by dsv4 (release f32 and transformers layouts) it reads back to the same logits.
  for (CheckpointLayout layout : {CheckpointLayout::Release, CheckpointLayout::Transformers}) {
    TmpDir d;
    SaveOptions so;
    so.layout = layout;
    so.format = CheckpointFormat::named("f32");
    save_checkpoint(*m, d.path.string(), so);
    EXPECT_LE(max_abs_err(*load_model(d.path.string()), ref), err) << checkpoint_layout_name(layout);
  }
}

}  // namespace
}  // namespace dsv4
