// Helpers shared by the LoRA tests (test_lora*.cpp).
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "model/checkpoint_io.h"
#include "model/lora.h"
#include "model/model.h"
#include "runtime/safetensors.h"

namespace dsv4::lora_test {

namespace fs = std::filesystem;

inline const std::string kLoraDir = std::string(DSV4_FIXTURE_DIR) + "/lora";
inline const std::string kHfBase = std::string(DSV4_FIXTURE_DIR) + "/ckpt/hf_saved_tiny";

struct TmpDir {
  fs::path path;
  explicit TmpDir(const std::string& tag) {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / fmt::format("dsv4_lora_{}_{}_{}", tag, ::getpid(), counter++);
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str(const std::string& sub = "") const { return sub.empty() ? path.string() : (path / sub).string(); }
};

// The transformers-layout tiny base with frozen weights (F32 storage here), as a LoRA run loads it.
inline std::unique_ptr<Model> load_frozen(const std::string& dir = kHfBase) {
  LoadOptions lo;
  lo.mode = LoadMode::FrozenQuantized;
  return load_model(dir, lo);
}

struct Batch {
  Tensor ids;  // I64 [B*S]
  SeqLayout layout{1, 1};
};

inline Batch read_ids(const SafetensorsFile& f) {
  const Tensor ids = f.load("input_ids");
  Batch b;
  b.layout = SeqLayout(ids.size(0), ids.size(1));
  b.ids = ids.view({ids.numel()});
  return b;
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double e = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) e = std::max(e, std::abs(static_cast<double>(a[i]) - b[i]));
  return e;
}

inline std::vector<float> logits(const Model& m, const Batch& b) {
  return m.forward(b.ids, b.layout, nullptr).logits_TV.to_floats();
}

// Deterministic non-zero B for every adapter (raw mt19937 bits: identical on every platform).
inline void fill_B(Model& m, uint64_t seed, float amplitude) {
  for (LoraAdapter* ad : lora_adapters(m)) {
    std::mt19937 gen(lora_init_seed(seed, ad->unit));
    float* p = ad->B.value.data<float>();
    for (int64_t i = 0; i < ad->B.value.numel(); ++i)
      p[i] = (static_cast<float>(gen() >> 8) * 0x1p-24f - 0.5f) * 2.0f * amplitude;
  }
}

inline Tensor random_ids(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<int64_t>(rng() % static_cast<uint32_t>(vocab));
  return Tensor::from_vector<int64_t>({n}, v);
}

inline bool bytes_equal(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || !(a.shape() == b.shape())) return false;
  const Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.raw_data(), cb.raw_data(), static_cast<size_t>(ca.nbytes())) == 0;
}

// Throws `what` containing every needle.
template <typename F>
void expect_error(F&& f, const std::vector<std::string>& needles, const std::string& ctx) {
  try {
    f();
    ADD_FAILURE() << ctx << ": no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << ctx << ": '" << n << "' not in: " << msg;
  }
}

// The release tiny checkpoint (FP8 dense, FP4 experts, E8M0 scales) written to `dir`, loaded as a LoRA run loads it
// (frozen, wo_a FP8 too) with adapters on attention incl. wo_a, routed and shared experts and the router, dropout 0.1
// in train mode (step 2's masks); B is left zero for the caller to fill.
inline std::unique_ptr<Model> adapted_release_model(const std::string& dir, bool write) {
  if (write) {
    MakeTinyOptions mo;
    mo.preset = "tiny";
    mo.seed = 6;
    mo.stddev = 0.2;
    mo.quant = "fp8";
    make_tiny_checkpoint(dir, mo);
  }
  LoadOptions lo;
  lo.mode = LoadMode::FrozenQuantized;
  lo.frozen_wo_a = true;
  auto m = load_model(dir, lo);
  LoraConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.dropout = 0.1;
  cfg.seed = 3;
  cfg.targets = {"attn.*", "shared_experts.*", "experts.*.w{1,2,3}", "ffn.gate"};
  apply_lora(*m, cfg);
  set_lora_train_mode(*m, true);
  set_lora_dropout_step(*m, 2);
  return m;
}

}  // namespace dsv4::lora_test
