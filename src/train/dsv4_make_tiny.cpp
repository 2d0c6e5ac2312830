// dsv4-make-tiny: a random-init checkpoint of a model preset, for tests and demos.
//   dsv4-make-tiny --preset tiny --seed 1 --format release|hf --out DIR [--quant fp8|fp8-base|bf16|none] [--std S]
//                  [--full-random]
// release: the native release layout (per-layer shards model-000NN-of-000MM.safetensors, index with
//          metadata.total_size, .scale tensors, mtp.0.*) and a config.json with the release keys. --quant fp8 (the
//          default) = FP8 dense weights + packed FP4 experts with E8M0 scales (instruct); fp8-base = FP8 everywhere
//          with F32 scales; bf16 / none (F32) = unquantised.
// hf:      the transformers layout (transformers' names, stacked experts, no MTP) in F32 (--quant none, the
//          default) or BF16, with a config.json in the transformers form.
// The weights are Model::init_random(seed, std) (with --full-random also the tensors it sets to constants, see
// MakeTinyOptions); the same arguments give the same files.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "model/checkpoint_io.h"

int main(int argc, char** argv) {
  CLI::App app{"dsv4-make-tiny: write a random-init DeepSeek-V4 checkpoint of a preset"};
  dsv4::MakeTinyOptions opts;
  std::string format = "release", out, quant;
  app.add_option("--preset", opts.preset, "model preset (tiny, small, proxy-2b, flash, pro)")->capture_default_str();
  app.add_option("--seed", opts.seed, "random seed of the initialisation")->capture_default_str();
  app.add_option("--format", format, "checkpoint layout")->check(CLI::IsMember({"release", "hf"}))->capture_default_str();
  app.add_option("--out", out, "output directory (created when missing)")->required();
  app.add_option("--quant", quant, "fp8 | fp8-base | bf16 | none (default: fp8 for release, none for hf)")
      ->check(CLI::IsMember({"fp8", "fp8-base", "bf16", "none"}));
  app.add_option("--std", opts.stddev, "std of the linear / embedding initialisation")->capture_default_str();
  app.add_flag("--full-random", opts.full_random,
               "also randomise norms, hc base/scale, sinks, ape and gate.bias (peer checks)");
  CLI11_PARSE(app, argc, argv);
  try {
    opts.layout = format == "hf" ? dsv4::CheckpointLayout::Transformers : dsv4::CheckpointLayout::Release;
    opts.quant = !quant.empty() ? quant : (format == "hf" ? "none" : "fp8");
    const dsv4::SaveReport r = dsv4::make_tiny_checkpoint(out, opts);
    std::printf("dsv4-make-tiny: wrote %s (%s layout, %s, preset %s, seed %llu): %d shards, %lld tensors, %lld bytes\n",
                out.c_str(), format.c_str(), dsv4::format_for_quant(opts.quant).name.c_str(), opts.preset.c_str(),
                static_cast<unsigned long long>(opts.seed), r.shards, static_cast<long long>(r.tensors),
                static_cast<long long>(r.total_size));
  } catch (const dsv4::Error& e) {
    std::fprintf(stderr, "dsv4-make-tiny: %s\n", e.message().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4-make-tiny: %s\n", e.what());
    return 1;
  }
  return 0;
}
