#!/usr/bin/env bash
# End-to-end checks of dsv4-train on the bundled corpus (run by ctest; also runnable by hand):
#   1. tiny pre-training: the training loss falls well below the corpus' unigram entropy (6.54 nats/token for
#      data/text.jsonl with data/tokenizer.json, measured with the `tokenizers` library); with train.precision=fp8
#      it ends within 5% of the fp32 run;
#   2. kill -9 in the middle of a run, resume with train.resume=auto: every step's metrics equal those of an
#      uninterrupted run, bit for bit (metrics.jsonl lines compared as text);
#   3. a config error is one line naming the file and key, exit code non-zero, earlier checkpoints untouched.
# Usage: train_e2e.sh BIN_DIR SOURCE_DIR
set -euo pipefail
bin=$1; src=$2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$src"
"$bin/dsv4-prep" --tokenizer data/tokenizer.json --input data/text.jsonl --format text \
  --output "$work/text.h5" --val-fraction 0.1 > /dev/null
common=(data.train="[$work/text.h5]" data.val="$work/text.val.h5" train.threads=1 logging.tensorboard=false
        train.log_interval=10)

echo "== 1. loss falls below the unigram entropy"
"$bin/dsv4-train" configs/tiny-pretrain.yaml "${common[@]}" train.out_dir="$work/a" train.steps=100 \
  optim.warmup_steps=10 train.eval_interval=100 checkpoint.interval=0 > "$work/a.log"
lm=$(grep -o '^step 100/100 | loss [0-9.]* (lm [0-9.]*' "$work/a.log" | awk '{print $NF}')
echo "training LM loss at step 100: $lm nats/token (unigram entropy 6.54)"
grep 'validation loss' "$work/a.log" || true
awk -v v="$lm" 'BEGIN { exit !(v != "" && v < 6.54 - 1.5) }' || { echo "FAIL: LM loss '$lm' not below 5.04"; exit 1; }

echo "== 1b. train.precision=fp8 (block-scaled FP8 weight GEMMs) learns like fp32"
"$bin/dsv4-train" configs/tiny-pretrain.yaml "${common[@]}" train.out_dir="$work/fp8" train.steps=100 \
  optim.warmup_steps=10 train.eval_interval=0 checkpoint.interval=0 train.precision=fp8 > "$work/fp8.log"
lm8=$(grep -o '^step 100/100 | loss [0-9.]* (lm [0-9.]*' "$work/fp8.log" | awk '{print $NF}')
echo "fp8 training LM loss at step 100: $lm8 nats/token (fp32: $lm)"
awk -v a="$lm8" -v b="$lm" 'BEGIN { exit !(a != "" && a < b * 1.05 && a > b * 0.95) }' ||
  { echo "FAIL: fp8 LM loss '$lm8' not within 5% of fp32's $lm"; exit 1; }

echo "== 2. kill -9 and resume reproduce the uninterrupted run"
run=(configs/tiny-pretrain.yaml "${common[@]}" data.micro_batch=2 data.seq_len=64 train.steps=50
     optim.warmup_steps=5 checkpoint.interval=10 checkpoint.keep=5)
"$bin/dsv4-train" "${run[@]}" train.out_dir="$work/straight" > /dev/null
"$bin/dsv4-train" "${run[@]}" train.out_dir="$work/killed" > /dev/null &
pid=$!
for _ in $(seq 1 600); do
  if grep -qs step_00000020 "$work/killed/checkpoints/latest"; then break; fi
  sleep 0.1
done
kill -9 "$pid" 2> /dev/null || true
wait "$pid" 2> /dev/null || true
grep -qs step_00000020 "$work/killed/checkpoints/latest" || { echo "FAIL: no step-20 checkpoint before the kill"; exit 1; }
"$bin/dsv4-train" "${run[@]}" train.out_dir="$work/killed" > "$work/resumed.log"
grep -q "resumed from .*step_00000020 at step 20" "$work/resumed.log" || { echo "FAIL: did not resume at step 20"; exit 1; }
# Last line per step (a step redone after the kill is logged twice) must equal the uninterrupted run's line,
# timings (tokens_per_s, gflops) aside.
last_per_step() { sed -E 's/, "(gflops|tokens_per_s)": [0-9.e+-]+//g' "$1" |
                  awk '{ match($0, /"step": [0-9]+/); s = substr($0, RSTART + 8, RLENGTH - 8); line[s] = $0 }
                       END { for (s = 1; s <= 50; s++) print line[s] }'; }
if ! diff <(last_per_step "$work/straight/metrics.jsonl") <(last_per_step "$work/killed/metrics.jsonl"); then
  echo "FAIL: resumed metrics differ from the uninterrupted run"; exit 1
fi
echo "metrics of all 50 steps identical after kill -9 at step >= 20 and resume"

echo "== 3. config errors"
set +e
out=$("$bin/dsv4-train" configs/tiny-pretrain.yaml "${common[@]}" train.out_dir="$work/killed" optim.lrr=1 2>&1)
rc=$?
set -e
[ "$rc" -ne 0 ] || { echo "FAIL: exit code 0 for a bad key"; exit 1; }
echo "$out" | grep -q "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" || { echo "FAIL: message: $out"; exit 1; }
grep -qs step_00000050 "$work/killed/checkpoints/latest" || { echo "FAIL: checkpoints touched"; exit 1; }
echo "== 4. dsv4-eval on the run and on a release-format checkpoint; training starts from that checkpoint"
json=$("$bin/dsv4-eval" --model "$work/a" --data "$work/text.h5" --max-batches 4 --json)
echo "$json"
echo "$json" | grep -Eq '^\{"loss": [0-9.]+, "ppl": [0-9.]+, "tokens": [0-9]+, "batches": 4\}$' || { echo "FAIL: eval JSON"; exit 1; }
"$bin/dsv4-make-tiny" --preset tiny --seed 3 --format release --out "$work/release" > /dev/null
base=$("$bin/dsv4-eval" --model "$work/release" --data "$work/text.h5" --max-batches 2 --batch 2 --json)
echo "release checkpoint: $base"
"$bin/dsv4-train" configs/tiny-pretrain.yaml "${common[@]}" model.preset= model.checkpoint="$work/release" \
  train.out_dir="$work/from_release" train.steps=1 optim.warmup_steps=0 data.micro_batch=2 > "$work/fr.log"
grep -q "loaded $work/release (release layout" "$work/fr.log" || { echo "FAIL: release checkpoint not loaded"; exit 1; }
first=$(grep -o '^step 1/1 | loss [0-9.]* (lm [0-9.]*' "$work/fr.log" | awk '{print $NF}')
b=$(echo "$base" | sed -E 's/.*"loss": ([0-9.]+).*/\1/')
echo "first training step LM loss $first vs checkpoint eval loss $b"
awk -v a="$first" -v b="$b" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d < 0.3) }' ||
  { echo "FAIL: training from the release checkpoint does not start at its loss"; exit 1; }
echo "== 5. LoRA over a frozen FP8/FP4 release checkpoint, PEFT adapter in the checkpoint, eval of the run"
"$bin/dsv4-make-tiny" --preset tiny --seed 1 --std 0.1 --format release --out "$work/lora-base" > /dev/null
"$bin/dsv4-prep" --tokenizer data/tokenizer.json --input data/chat.jsonl --format chat --output "$work/chat.h5" > /dev/null
"$bin/dsv4-train" configs/tiny-lora.yaml model.checkpoint="$work/lora-base" data.train="[$work/chat.h5]" data.val= \
  train.out_dir="$work/lora" train.steps=40 train.threads=1 logging.tensorboard=false checkpoint.interval=20 \
  > "$work/lora.log"
grep -q "LoRA r=8 alpha=16: 36 adapters" "$work/lora.log" || { echo "FAIL: adapters not attached"; exit 1; }
l10=$(grep -o '^step 10/40 | loss [0-9.]* (lm [0-9.]*' "$work/lora.log" | awk '{print $NF}')
l40=$(grep -o '^step 40/40 | loss [0-9.]* (lm [0-9.]*' "$work/lora.log" | awk '{print $NF}')
echo "LoRA LM loss step 10: $l10, step 40: $l40"
awk -v a="$l10" -v b="$l40" 'BEGIN { exit !(a != "" && b != "" && b < a - 0.5) }' || { echo "FAIL: LoRA loss did not fall"; exit 1; }
[ -f "$work/lora/checkpoints/step_00000040/adapter/adapter_config.json" ] || { echo "FAIL: no PEFT adapter"; exit 1; }
"$bin/dsv4-eval" --model "$work/lora" --data "$work/chat.h5" --max-batches 2 --json | grep -q '"loss"' ||
  { echo "FAIL: eval of the LoRA run"; exit 1; }
echo "e2e: all checks passed"
