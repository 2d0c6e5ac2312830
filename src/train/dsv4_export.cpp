// dsv4-export: merge a PEFT LoRA adapter into a DeepSeek-V4 checkpoint, or normalise the adapter.
//   dsv4-export --base DIR --adapter DIR --out DIR [--format release|bf16|f32] [--layout release|hf]
//   dsv4-export --base DIR --adapter DIR --out DIR --adapter-only
// The merge is W' = W + s B A in FP32 for every adapted weight; the output is written shard by shard (one layer at
// a time, host memory bounded by the largest layer) in the release layout (same names, per-layer shards and index as
// the release; --format release requantises to FP8 128x128 / FP4 1x32 in the base's release format, instruct when
// the base is not quantised) or the transformers layout (--layout hf, bf16 / f32 only). --adapter-only writes the
// adapter as dsv4 reads it (validated against the base's config) in the PEFT format. See src/model/peft.h.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "model/peft.h"

int main(int argc, char** argv) {
  CLI::App app{"dsv4-export: merge a PEFT LoRA adapter into a DeepSeek-V4 checkpoint"};
  std::string base, adapter, out, format = "release", layout = "release";
  bool adapter_only = false;
  app.add_option("--base", base, "base checkpoint directory (release or transformers layout)")->required();
  app.add_option("--adapter", adapter, "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
      ->required();
  app.add_option("--out", out, "output directory (created when missing)")->required();
  app.add_option("--format", format, "release (FP8 + FP4 requantised), bf16 or f32")
      ->check(CLI::IsMember({"release", "bf16", "f32"}))
      ->capture_default_str();
  app.add_option("--layout", layout, "output layout")->check(CLI::IsMember({"release", "hf"}))->capture_default_str();
  app.add_flag("--adapter-only", adapter_only, "write the (normalised) PEFT adapter instead of a merged checkpoint");
  CLI11_PARSE(app, argc, argv);
  try {
    dsv4::ExportOptions o;
    o.format = format;
    o.layout = layout == "hf" ? dsv4::CheckpointLayout::Transformers : dsv4::CheckpointLayout::Release;
    o.adapter_only = adapter_only;
    const dsv4::ExportReport r = dsv4::export_merged(base, adapter, out, o);
    if (adapter_only)
      std::printf("dsv4-export: wrote the adapter (%lld units) to %s\n", static_cast<long long>(r.tensors), out.c_str());
    else
      std::printf("dsv4-export: wrote %s (%s layout, %s): %d shards, %lld tensors, %lld bytes; %lld weights merged "
                  "(%lld deltas); largest shard %lld bytes\n",
                  out.c_str(), layout.c_str(), r.format.c_str(), r.shards, static_cast<long long>(r.tensors),
                  static_cast<long long>(r.total_size), static_cast<long long>(r.merged_weights),
                  static_cast<long long>(r.deltas), static_cast<long long>(r.max_shard_bytes));
  } catch (const dsv4::Error& e) {
    std::fprintf(stderr, "dsv4-export: %s\n", e.message().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4-export: %s\n", e.what());
    return 1;
  }
  return 0;
}
