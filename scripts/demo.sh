#!/usr/bin/env bash
# The tiny end-to-end demo on a CPU (a minute or two after the build): make a tiny release-format DeepSeek-V4
# checkpoint (FP8 dense + FP4 experts, like the real release), tokenise the bundled chat sample, LoRA-fine-tune it
# with the base frozen in FP8/FP4, evaluate before and after, and sample a reply. Re-running resumes / reuses.
# Pre-training from scratch instead: build/bin/dsv4-train configs/tiny-pretrain.yaml (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja > /dev/null
cmake --build build
mkdir -p runs/data
[ -f runs/tiny-base/config.json ] ||
  build/bin/dsv4-make-tiny --preset tiny --seed 1 --std 0.1 --format release --out runs/tiny-base
build/bin/dsv4-prep --tokenizer data/tokenizer.json --input data/chat.jsonl --format chat \
  --output runs/data/chat.h5 --val-fraction 0.1
build/bin/dsv4-train configs/tiny-lora.yaml
echo "== before fine-tuning (base)"
build/bin/dsv4-eval --model runs/tiny-base --data runs/data/chat.h5
echo "== after fine-tuning (base + adapter)"
build/bin/dsv4-eval --model runs/tiny-lora --data runs/data/chat.h5
echo "== sample"
build/bin/dsv4-eval --model runs/tiny-lora --tokenizer data/tokenizer.json --max-new-tokens 24 \
  --prompt "<｜begin▁of▁sentence｜><｜User｜>What is the boiling point of water at sea level?<｜Assistant｜></think>"
echo "adapter in PEFT format: $(ls -d runs/tiny-lora/checkpoints/step_*/adapter | tail -1)"
