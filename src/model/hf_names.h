// Parameter names: the native DeepSeek release names (our internal names) and the Hugging Face transformers
// DeepseekV4 names (shared/reference/hf-transformers-deepseek-v4-and-peft.md §3.2), both ways.
// Routed experts differ in layout, not only in name: HF stacks them as
//   mlp.experts.gate_up_proj [E, 2I, D] = cat(w1_e, w3_e) over rows, and mlp.experts.down_proj [E, D, I] = w2_e,
// so whole state dicts are converted with hf_state_to_native / native_state_to_hf.
// MTP (mtp.*) has no HF name: transformers does not instantiate it.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "runtime/tensor.h"

namespace dsv4 {

// Name of one non-expert tensor; nullopt when it has no counterpart (MTP, per-expert weights).
std::optional<std::string> native_to_hf_name(const std::string& native);
std::optional<std::string> hf_to_native_name(const std::string& hf);

// Whole state dicts (experts split / stacked). Unknown names are errors naming them.
std::map<std::string, Tensor> hf_state_to_native(const std::map<std::string, Tensor>& hf);
std::map<std::string, Tensor> native_state_to_hf(const std::map<std::string, Tensor>& native);

}  // namespace dsv4
