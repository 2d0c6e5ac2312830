// dsv4-plan CONFIG.yaml [section.key=value ...] [--gpu h100|h200|cpu] [--gpu-mem-gib N] [--zero1] [--world N]
//           [--checkpoint-format instruct|base|bf16|f32] [--json]
// Per-rank memory (weights by dtype, gradients, optimizer states, LoRA adapters, activations with and without
// recomputation), communication volume per step and an estimated step time for a training config and its parallel
// layout, with a fits / does-not-fit verdict (src/train/plan.h). Reads no weights: a release checkpoint that is not
// on this machine can be planned by naming its model (model.preset=flash|pro).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>
#include <vector>

#include "runtime/error.h"
#include "train/plan.h"

int main(int argc, char** argv) {
  CLI::App app{"dsv4-plan: per-rank memory, communication and step-time estimate for a dsv4-train config"};
  std::string config, gpu = "h100", ckpt_format;
  std::vector<std::string> overrides;
  double mem_gib = 0;
  int64_t world = 0;
  bool json = false, zero1 = false;
  app.add_option("config", config, "training config (YAML)")->required();
  app.add_option("overrides", overrides, "section.key=value overrides, as for dsv4-train");
  app.add_option("--gpu", gpu, "target: h100, h200 or cpu")->capture_default_str()
      ->check(CLI::IsMember({"h100", "h200", "cpu"}));
  app.add_option("--gpu-mem-gib", mem_gib, "device memory in GiB (default: the target's)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--world", world, "world size to check the layout against (default: dp x tp)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--checkpoint-format", ckpt_format, "format of model.checkpoint when it is not on this machine")
      ->check(CLI::IsMember({"instruct", "base", "bf16", "f32"}));
  app.add_flag("--zero1", zero1, "plan with ZeRO-1 even when the config sets parallel.zero1=false");
  app.add_flag("--json", json, "print the plan as JSON");
  CLI11_PARSE(app, argc, argv);
  try {
    dsv4::TrainConfig cfg;
    try {
      cfg = dsv4::load_train_config(config, overrides);
    } catch (const dsv4::Error& e) {
      // The plan needs no data: a config without data.train is planned as if it had one.
      if (e.message().find("'data.train' needs") == std::string::npos) throw;
      std::vector<std::string> o = overrides;
      o.push_back("data.train=[unused-by-dsv4-plan]");
      cfg = dsv4::load_train_config(config, o);
    }
    dsv4::PlanSetup setup = dsv4::plan_setup(cfg, config, ckpt_format);
    setup.zero1 = setup.zero1 || zero1;
    setup.world = world;
    dsv4::HardwareSpec hw = dsv4::HardwareSpec::named(gpu);
    if (mem_gib > 0) {
      hw.memory_bytes = static_cast<int64_t>(mem_gib * 1024.0 * 1024.0 * 1024.0);
      hw.description += fmt::format("; memory set to {:g} GiB", mem_gib);
    } else if (!hw.gpu) {
      const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
      if (pages > 0 && page > 0) hw.memory_bytes = static_cast<int64_t>(pages) * page;
    }
    const dsv4::PlanReport r = dsv4::plan(setup, hw);
    std::fputs((json ? dsv4::plan_json(r) : dsv4::format_plan(r)).c_str(), stdout);
    return 0;
  } catch (const dsv4::Error& e) {
    std::fprintf(stderr, "dsv4-plan: error: %s\n", e.message().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4-plan: error: %s\n", e.what());
  }
  return 1;
}
