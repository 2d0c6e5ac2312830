// dsv4-export (export_merged in src/model/peft.h): merging a PEFT adapter into a base checkpoint.
//  * F32 output: logits of the merged checkpoint = logits of base + adapter (<= 1e-5), release and transformers layouts.
//  * Release output over an FP8/FP4 base: same files, names, dtypes, shapes and index as the base; merged weights are
//    exactly quantize(dequant(W) + s B A) in the base's format, every other tensor byte-identical; the logits differ
//    from base + adapter by the requantisation error only (reported).
//  * --adapter-only normalisation, BF16 output, and the errors.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "model/peft.h"
#include "test_lora_util.h"

namespace dsv4 {
namespace {

using namespace lora_test;

const std::string kPeftAdapter = kLoraDir + "/peft_adapter";

std::vector<std::string> safetensors_files(const std::string& dir) {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

TEST(LoraExport, MergedF32EqualsBasePlusAdapter) {
  const SafetensorsFile ref = SafetensorsFile::open(kLoraDir + "/peft_adapter.logits.safetensors");
  const Batch b = read_ids(ref);
  auto m = load_frozen();
  load_peft_adapter(*m, kPeftAdapter);
  const std::vector<float> want = logits(*m, b);
  for (CheckpointLayout layout : {CheckpointLayout::Release, CheckpointLayout::Transformers}) {
    TmpDir d("merge_f32");
    ExportOptions o;
    o.format = "f32";
    o.layout = layout;
    const ExportReport r = export_merged(kHfBase, kPeftAdapter, d.str(), o);
    // Per layer: q_a, q_b, kv, o_b, o_a, 3 shared, router, 4 experts x (w1, w3, w2).
    EXPECT_EQ(r.merged_weights, 3 * 21);
    EXPECT_EQ(r.deltas, 3 * 21);
    EXPECT_EQ(r.shards, 3 + 2);  // embed, 3 layers, head (no MTP in this model)
    LoadReport lr;
    auto merged = load_model(d.str(), {}, {}, &lr);
    EXPECT_EQ(lr.layout, layout);
    EXPECT_TRUE(lora_adapters(*merged).empty());
    const double err = max_abs_diff(logits(*merged, b), want);
    EXPECT_LE(err, 1e-5) << checkpoint_layout_name(layout);
    std::printf("[merge f32, %s layout] logits of the merged checkpoint vs base + adapter: max abs err %.3g "
                "(largest shard %lld bytes)\n",
                std::string(checkpoint_layout_name(layout)).c_str(), err, static_cast<long long>(r.max_shard_bytes));
    if (layout == CheckpointLayout::Release) {
      // One merged weight against W + s B A computed here.
      const AdapterSet set = read_peft_adapter(kPeftAdapter, m->config());
      const AdapterTensors& a = *set.find("layers.1.attn.wo_a");
      const Tensor w0 = SafetensorsCheckpoint::open(kHfBase).load("model.layers.1.attn.wo_a.weight");
      const Tensor w1 = SafetensorsCheckpoint::open(d.str()).load("layers.1.attn.wo_a.weight");
      const auto A = a.A.to_floats(), B = a.B.to_floats(), W0 = w0.to_floats(), W1 = w1.to_floats();
      const int64_t r0 = a.A.size(0), in = a.A.size(1), out = a.B.size(0);
      double worst = 0;
      for (int64_t o2 = 0; o2 < out; ++o2)
        for (int64_t i = 0; i < in; ++i) {
          double dlt = 0;
          for (int64_t k = 0; k < r0; ++k)
            dlt += static_cast<double>(B[static_cast<size_t>(o2 * r0 + k)]) * A[static_cast<size_t>(k * in + i)];
          const double expect = W0[static_cast<size_t>(o2 * in + i)] + a.scale * dlt;
          worst = std::max(worst, std::abs(expect - W1[static_cast<size_t>(o2 * in + i)]));
        }
      EXPECT_LE(worst, 1e-6);
    }
  }
}

TEST(LoraExport, ReleaseFp8RequantisesOnlyMergedWeights) {
  TmpDir d("merge_fp8");
  MakeTinyOptions mo;
  mo.preset = "tiny";
  mo.seed = 5;
  mo.stddev = 0.2;
  mo.quant = "fp8";
  make_tiny_checkpoint(d.str("base"), mo);
  auto m = load_frozen(d.str("base"));
  LoraConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.targets = {"attn.*", "shared_experts.*", "layers.{1,2}.ffn.experts.*.w{1,2,3}", "layers.3.ffn.experts.0.w3",
                 "ffn.gate", "mtp.0.attn.wq_b"};
  apply_lora(*m, cfg);
  fill_B(*m, 4, 0.05f);
  save_peft_adapter(*m, d.str("adapter"), PeftSaveOptions{cfg, d.str("base")});
  const Batch b{random_ids(2 * 17, m->config().vocab_size, 6), SeqLayout(2, 17)};
  const std::vector<float> want = logits(*m, b);

  ExportOptions o;  // release format = the base's (instruct: FP8 + FP4, E8M0 scales)
  const ExportReport r = export_merged(d.str("base"), d.str("adapter"), d.str("out"), o);
  EXPECT_EQ(r.format, "instruct");
  // Same files, tensor names, dtypes and shapes as the base; index included.
  ASSERT_EQ(safetensors_files(d.str("out")), safetensors_files(d.str("base")));
  const SafetensorsCheckpoint base = SafetensorsCheckpoint::open(d.str("base"));
  const SafetensorsCheckpoint out = SafetensorsCheckpoint::open(d.str("out"));
  ASSERT_EQ(out.names(), base.names());
  const AdapterSet set = read_peft_adapter(d.str("adapter"), m->config());
  const ParamTable table = ParamTable::build(m->config());
  int64_t merged = 0, untouched = 0;
  for (const ParamEntry& e : table.entries()) {
    EXPECT_EQ(out.file_of(e.name), base.file_of(e.name)) << e.name;
    const SafetensorsEntry& be = base.entry(e.name);
    const SafetensorsEntry& oe = out.entry(e.name);
    EXPECT_EQ(oe.dtype, be.dtype) << e.name;
    EXPECT_EQ(oe.shape, be.shape) << e.name;
    const bool quant = e.scale.has_value();
    QuantizedWeight bq;
    if (quant) bq = QuantizedWeight::from_tensors(base.view(e.name), base.view(e.scale->name), e.name);
    Tensor w = quant ? bq.dequantize() : (e.role == TensorRole::Index ? Tensor() : base.view(e.name).to(DType::F32));
    if (w.defined() && merge_adapter_deltas(set, m->config(), e.name, w) > 0) {
      ++merged;
      if (quant) {
        const QuantizedWeight q = quantize_weight(w, e.format, table.format().scale, e.name);
        const QuantizedWeight oq = QuantizedWeight::from_tensors(out.view(e.name), out.view(e.scale->name), e.name);
        EXPECT_TRUE(bytes_equal(oq.data, q.data)) << e.name;  // the FP8 / FP4 codes
        EXPECT_TRUE(bytes_equal(oq.scale, q.scale)) << e.name;
      } else {
        EXPECT_TRUE(bytes_equal(out.view(e.name), w.to(be.dtype))) << e.name;
      }
    } else {
      ++untouched;
      EXPECT_TRUE(bytes_equal(out.view(e.name), base.view(e.name))) << e.name;
      if (quant) EXPECT_TRUE(bytes_equal(out.view(e.scale->name), base.view(e.scale->name))) << e.name;
    }
  }
  EXPECT_EQ(merged, r.merged_weights);
  EXPECT_GT(untouched, 0);
  const nlohmann::json bi = nlohmann::json::parse(std::ifstream(d.str("base") + "/model.safetensors.index.json"));
  const nlohmann::json oi = nlohmann::json::parse(std::ifstream(d.str("out") + "/model.safetensors.index.json"));
  EXPECT_EQ(oi.at("weight_map"), bi.at("weight_map"));
  EXPECT_EQ(oi.at("metadata").at("total_size"), bi.at("metadata").at("total_size"));
  int64_t largest = 0;
  for (const std::string& f : safetensors_files(d.str("base")))
    largest = std::max<int64_t>(largest, static_cast<int64_t>(fs::file_size(d.str("base") + "/" + f)));
  EXPECT_LE(r.max_shard_bytes, largest);

  // Logits. (1) The same merge kept in F32 gives base + adapter to FP32 rounding. (2) The FP8/FP4 export gives exactly
  // what an F32 model holding the requantised merged weights gives: its whole difference from base + adapter is the
  // requantisation of the merged weights (stated below: weight errors relative to the adapter deltas, and logits).
  auto exported = load_frozen(d.str("out"));
  const std::vector<float> got = logits(*exported, b);
  double max_logit = 0;
  for (float v : want) max_logit = std::max(max_logit, static_cast<double>(std::abs(v)));
  ExportOptions f32;
  f32.format = "f32";
  export_merged(d.str("base"), d.str("adapter"), d.str("out_f32"), f32);
  auto sub = load_model(d.str("out_f32"));
  const double err_f32 = max_abs_diff(logits(*sub, b), want);
  EXPECT_LE(err_f32, 1e-5 * std::max(1.0, max_logit));
  double dq8 = 0, dd8 = 0, dq4 = 0, dd4 = 0;  // squared norms: requantisation error, adapter delta
  auto slots = model_weight_slots(*sub);
  for (const ParamEntry& e : table.entries()) {
    if (!e.scale) {  // merged plain BF16 tensors (the routers): BF16-rounded in the export
      if (e.disk_dtype != DType::BF16 || e.role == TensorRole::Index) continue;
      Tensor w0 = base.view(e.name).to(DType::F32);
      if (merge_adapter_deltas(set, m->config(), e.name, w0) == 0) continue;
      Tensor& v = slots.at(e.name).f32_value();
      ops::copy(v.to(DType::BF16).to(DType::F32), v);
      continue;
    }
    Tensor& v = slots.at(e.name).f32_value();  // W' = dequant(W) + dW (F32)
    Tensor w0 = QuantizedWeight::from_tensors(base.view(e.name), base.view(e.scale->name), e.name).dequantize();
    if (merge_adapter_deltas(set, m->config(), e.name, w0) == 0) continue;
    const Tensor dq = quantize_weight(v, e.format, table.format().scale, e.name).dequantize();
    const Tensor w_base = QuantizedWeight::from_tensors(base.view(e.name), base.view(e.scale->name), e.name).dequantize();
    const auto pv = v.to_floats(), pq = dq.to_floats(), pb = w_base.to_floats();
    double& eq = e.format == WeightFormat::FP8 ? dq8 : dq4;
    double& ed = e.format == WeightFormat::FP8 ? dd8 : dd4;
    for (size_t i = 0; i < pv.size(); ++i) {
      eq += (static_cast<double>(pq[i]) - pv[i]) * (static_cast<double>(pq[i]) - pv[i]);
      ed += (static_cast<double>(pv[i]) - pb[i]) * (static_cast<double>(pv[i]) - pb[i]);
    }
    ops::copy(dq, v);
  }
  const double err_consistent = max_abs_diff(got, logits(*sub, b));
  EXPECT_LE(err_consistent, 1e-5 * std::max(1.0, max_logit));
  const double err = max_abs_diff(got, want);
  remove_lora(*m);
  const double adapter_effect = max_abs_diff(logits(*m, b), want);
  std::printf("[merge fp8/fp4 release] %lld merged weights requantised (codes = quantize(W + s B A) exactly), %lld "
              "tensors byte-identical. Requantisation error / adapter delta (Frobenius): FP8 dense %.3f, FP4 experts "
              "%.3f. Logits (max |logit| %.3g): F32 merge vs base + adapter %.3g; FP8/FP4 export vs base + adapter %.3g "
              "(the adapter's own effect: %.3g); FP8/FP4 export vs F32 model with the requantised merged weights %.3g\n",
              static_cast<long long>(merged), static_cast<long long>(untouched), std::sqrt(dq8 / dd8),
              std::sqrt(dq4 / dd4), max_logit, err_f32, err, adapter_effect, err_consistent);
}

TEST(LoraExport, AdapterOnlyBf16AndErrors) {
  TmpDir d("export_misc");
  // --adapter-only: the adapter as dsv4 reads it, rewritten; it reads back identically.
  ExportOptions ao;
  ao.adapter_only = true;
  export_merged(kHfBase, kPeftAdapter, d.str("adapter"), ao);
  const ModelConfig cfg = load_checkpoint_config(kHfBase);
  const AdapterSet a = read_peft_adapter(kPeftAdapter, cfg), a2 = read_peft_adapter(d.str("adapter"), cfg);
  EXPECT_FALSE(a.from_dsv4);
  EXPECT_TRUE(a2.from_dsv4);
  ASSERT_EQ(a.adapters.size(), a2.adapters.size());
  for (size_t i = 0; i < a.adapters.size(); ++i) {
    EXPECT_EQ(a.adapters[i].unit, a2.adapters[i].unit);
    EXPECT_TRUE(bytes_equal(a.adapters[i].A, a2.adapters[i].A)) << a.adapters[i].unit;
    EXPECT_TRUE(bytes_equal(a.adapters[i].B, a2.adapters[i].B)) << a.adapters[i].unit;
    EXPECT_DOUBLE_EQ(a.adapters[i].scale, a2.adapters[i].scale);
  }
  // BF16 output (release layout): within BF16 rounding of base + adapter.
  const SafetensorsFile ref = SafetensorsFile::open(kLoraDir + "/peft_adapter.logits.safetensors");
  const Batch b = read_ids(ref);
  auto m = load_frozen();
  load_peft_adapter(*m, kPeftAdapter);
  ExportOptions bo;
  bo.format = "bf16";
  export_merged(kHfBase, kPeftAdapter, d.str("bf16"), bo);
  EXPECT_EQ(checkpoint_format_of(d.str("bf16")).name, "bf16");
  // Every tensor is the BF16 rounding of the F32 merge.
  ExportOptions fo;
  fo.format = "f32";
  export_merged(kHfBase, kPeftAdapter, d.str("f32"), fo);
  const SafetensorsCheckpoint c16 = SafetensorsCheckpoint::open(d.str("bf16"));
  const SafetensorsCheckpoint c32 = SafetensorsCheckpoint::open(d.str("f32"));
  ASSERT_EQ(c16.names(), c32.names());
  for (const std::string& n : c32.names()) {
    const Tensor t32 = c32.view(n);
    const Tensor t16 = c16.view(n);
    EXPECT_TRUE(bytes_equal(t16, t32.dtype() == DType::F32 && t16.dtype() == DType::BF16 ? t32.to(DType::BF16) : t32))
        << n;
  }
  const double err = max_abs_diff(logits(*load_frozen(d.str("bf16")), b), logits(*m, b));
  std::printf("[merge bf16] every tensor = BF16(W + s B A); logits vs base + adapter: max abs err %.3g (BF16 weight "
              "rounding, relative 2^-9)\n",
              err);
  // Errors.
  ExportOptions bad;
  bad.layout = CheckpointLayout::Transformers;  // with --format release
  expect_error([&] { export_merged(kHfBase, kPeftAdapter, d.str("x"), bad); }, {"transformers layout"}, "hf + release");
  expect_error([&] { export_merged(kHfBase, kPeftAdapter, kHfBase, ExportOptions{}); }, {"must differ"}, "out == base");
  expect_error([&] { export_merged(kHfBase, d.str("missing"), d.str("y"), ExportOptions{}); }, {"adapter_config.json"},
               "no adapter");
  // A transformers checkpoint of a model with MTP cannot give a release checkpoint (it has no MTP weights).
  MakeTinyOptions mo;
  mo.layout = CheckpointLayout::Transformers;
  mo.quant = "none";
  make_tiny_checkpoint(d.str("hf_mtp"), mo);
  auto mm = load_frozen(d.str("hf_mtp"));
  LoraConfig lc;
  lc.targets = {"wq_a"};
  apply_lora(*mm, lc);
  save_peft_adapter(*mm, d.str("hf_mtp_adapter"));
  expect_error([&] { export_merged(d.str("hf_mtp"), d.str("hf_mtp_adapter"), d.str("z"), ExportOptions{}); },
               {"mtp.0.", "--layout hf"}, "mtp");
  ExportOptions hf;
  hf.layout = CheckpointLayout::Transformers;
  hf.format = "f32";
  EXPECT_EQ(export_merged(d.str("hf_mtp"), d.str("hf_mtp_adapter"), d.str("z2"), hf).merged_weights,
            mm->config().n_layers);
}

}  // namespace
}  // namespace dsv4
