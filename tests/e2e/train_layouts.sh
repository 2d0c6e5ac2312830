#!/usr/bin/env bash
# Every parallel layout trains like one rank (CPU, MPI, tiny model, FP32): 5 steps with the same global batch (4 rows)
# must give the loss sequence of the single-rank run (relative difference <= 1e-5: the same sums in another order),
#   full training (Muon + AdamW, MTP, balance loss, bias updates): dp2, tp2, ep2, ep4, dp2·tp2, tp2·ep2, dp2·tp2·ep2
#     (4 ranks: dp2·tp2 with ep2), tp2·ep4 (8 ranks)
#   LoRA over a frozen base: tp2, dp2·tp2·ep2, tp2·ep4
#   per-layer recomputation under dp2·tp2·ep4, gradient accumulation (2 x 1 row) under dp2·tp2
# and a checkpoint written under one layout resumes under another with the same state:
#   dp2·tp2·ep2 -> ep4 (4 ranks: dp4), tp2·ep4 -> one rank; steps 4-5 equal the uninterrupted single-rank run.
# The tensor-op path (DSV4_OPS_PATH=1: the code a GPU run executes, on CPU tensors) under dp2·tp2·ep2 and tp2·ep4,
# full training and LoRA, equals the single-rank reference too.
# Usage: train_layouts.sh BIN_DIR SOURCE_DIR MPIEXEC
set -euo pipefail
bin=$1; src=$2; mpiexec=$3
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$src"
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
"$bin/dsv4-prep" --tokenizer data/tokenizer.json --input data/text.jsonl --format text --output "$work/text.h5" > /dev/null
"$bin/dsv4-prep" --tokenizer data/tokenizer.json --input data/chat.jsonl --format chat --output "$work/chat.h5" > /dev/null
# bf16 base: tp slices of tiny matrices are not aligned to FP8's 128-row scale blocks
"$bin/dsv4-make-tiny" --preset tiny --seed 1 --std 0.1 --format release --quant bf16 --out "$work/base" > /dev/null
common=(data.val= train.threads=1 logging.tensorboard=false train.log_interval=1 train.steps=5 optim.warmup_steps=1
        data.seq_len=32 checkpoint.interval=0)
pretrain=(configs/tiny-pretrain.yaml "${common[@]}" data.train="[$work/text.h5]")
lora=(configs/tiny-lora.yaml "${common[@]}" data.train="[$work/chat.h5]" model.checkpoint="$work/base"
      "lora.targets=[attn.wq_a,attn.wq_b,attn.wkv,attn.wo_a,attn.wo_b,shared_experts.*,experts.*.w2,ffn.gate]")

# run NAME NP TP EP ARGS...: global batch 4 rows = dp ranks x micro_batch
run() {
  local name=$1 np=$2 tp=$3 ep=$4; shift 4
  local dp=$((np / tp))
  local args=("$@" parallel.tp="$tp" parallel.ep="$ep" data.micro_batch=$((4 / dp)) train.out_dir="$work/$name")
  if [ "$np" -eq 1 ]; then
    "$bin/dsv4-train" "${args[@]}" > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; exit 1; }
  else
    local env=(); [ -n "${DSV4_OPS_PATH:-}" ] && env=(-x DSV4_OPS_PATH)
    "$mpiexec" -np "$np" --oversubscribe --bind-to none "${root[@]}" "${env[@]}" "$bin/dsv4-train" "${args[@]}" \
      > "$work/$name.log" 2>&1 || { tail -20 "$work/$name.log"; echo "FAIL: $name"; exit 1; }
  fi
}
losses() { grep -o '"loss": [0-9.e+-]*' "$work/$1/metrics.jsonl" | awk '{print $2}'; }
# same REF RUN [FIRST_STEP]: RUN's losses equal REF's from step FIRST_STEP on
same() {
  local ref=$1 got=$2 first=${3:-1}
  paste <(losses "$ref" | tail -n +"$first") <(losses "$got") | awk -v run="$got" '
    { d = $1 - $2; if (d < 0) d = -d; r = d / ($1 < 0 ? -$1 : $1); if (r > worst) worst = r; n++ }
    END { printf "%-24s %d steps, worst relative difference %.2e\n", run, n, worst
          if (n == 0 || worst > 1e-5) { print "FAIL: " run " differs from the single-rank run"; exit 1 } }'
}

run pre-ref 1 1 1 "${pretrain[@]}"
for layout in "2 1 1" "2 2 1" "2 1 2" "4 1 4" "4 2 1" "2 2 2" "4 2 2" "8 2 4"; do
  set -- $layout
  name="pre-np$1-tp$2-ep$3"
  run "$name" "$1" "$2" "$3" "${pretrain[@]}"
  same pre-ref "$name"
done

# Per-layer recomputation (collectives re-run inside the recomputed forward) and gradient accumulation under layouts.
run pre-rc-np4-tp2-ep4 4 2 4 "${pretrain[@]}" train.recompute=true
same pre-ref pre-rc-np4-tp2-ep4
"$mpiexec" -np 4 --oversubscribe --bind-to none "${root[@]}" "$bin/dsv4-train" "${pretrain[@]}" parallel.tp=2 \
  data.micro_batch=1 data.grad_accum=2 train.out_dir="$work/pre-ga-np4-tp2" > "$work/pre-ga.log" 2>&1 ||
  { tail -20 "$work/pre-ga.log"; echo "FAIL: grad_accum run"; exit 1; }
same pre-ref pre-ga-np4-tp2

run lora-ref 1 1 1 "${lora[@]}"
for layout in "2 2 1" "4 2 2" "8 2 4"; do
  set -- $layout
  name="lora-np$1-tp$2-ep$3"
  run "$name" "$1" "$2" "$3" "${lora[@]}"
  same lora-ref "$name"
done

for layout in "4 2 2" "8 2 4"; do
  set -- $layout
  DSV4_OPS_PATH=1 run "pre-ops-np$1-tp$2-ep$3" "$1" "$2" "$3" "${pretrain[@]}"
  same pre-ref "pre-ops-np$1-tp$2-ep$3"
  DSV4_OPS_PATH=1 run "lora-ops-np$1-tp$2-ep$3" "$1" "$2" "$3" "${lora[@]}"
  same lora-ref "lora-ops-np$1-tp$2-ep$3"
done

# The PEFT copy of a parallel LoRA run's adapters (assembled from every rank's slices) evaluates like one rank's.
evl() { "$bin/dsv4-eval" --model "$work/$1" --data "$work/chat.h5" --max-batches 2 --json | grep -o '"loss": *[0-9.e+-]*' | grep -o '[0-9.e+-]*$'; }
[ -f "$work/lora-np8-tp2-ep4/checkpoints/step_00000005/adapter/adapter_config.json" ] || { echo "FAIL: no PEFT adapter"; exit 1; }
awk -v a="$(evl lora-ref)" -v b="$(evl lora-np8-tp2-ep4)" 'BEGIN { d = a - b; if (d < 0) d = -d
  printf "eval of the PEFT adapters: %s (one rank) vs %s (tp2·ep4)\n", a, b; if (a == "" || d / a > 1e-5) exit 1 }' ||
  { echo "FAIL: the tp2·ep4 PEFT adapter evaluates differently"; exit 1; }

# Resharding: checkpoint at step 3 under one layout, resume under another.
run pre-ck-a 4 2 2 "${pretrain[@]}" checkpoint.interval=3
run pre-rs-a 4 1 4 "${pretrain[@]}" train.resume="$work/pre-ck-a/checkpoints/step_00000003"
grep -q "resharded to" "$work/pre-rs-a.log" || { echo "FAIL: no resharding message"; exit 1; }
same pre-ref pre-rs-a 4
run pre-ck-b 8 2 4 "${pretrain[@]}" checkpoint.interval=3
run pre-rs-b 1 1 1 "${pretrain[@]}" train.resume="$work/pre-ck-b/checkpoints/step_00000003"
same pre-ref pre-rs-b 4
run lora-ck 4 2 2 "${lora[@]}" checkpoint.interval=3
run lora-rs 2 2 1 "${lora[@]}" train.resume="$work/lora-ck/checkpoints/step_00000003"
same lora-ref lora-rs 4
# A rank that fails ends the whole job (no hang) with a message naming it; the checkpoint before the failure resumes.
set +e
timeout 300 "$mpiexec" -np 4 --oversubscribe --bind-to none "${root[@]}" -x DSV4_FAULT=3:4 "$bin/dsv4-train" \
  "${pretrain[@]}" parallel.tp=2 parallel.ep=2 data.micro_batch=2 checkpoint.interval=3 train.out_dir="$work/fault" \
  > "$work/fault.log" 2>&1
rc=$?
set -e
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { tail -5 "$work/fault.log"; echo "FAIL: rank failure gave exit code $rc"; exit 1; }
grep -q "rank 3 of 4: error: injected fault" "$work/fault.log" || { tail -5 "$work/fault.log"; echo "FAIL: no rank named"; exit 1; }
run pre-fault-rs 1 1 1 "${pretrain[@]}" train.resume="$work/fault/checkpoints/step_00000003"
same pre-ref pre-fault-rs 4
# A layout that does not fit the ranks or the model: one line naming the file and the section, non-zero exit.
set +e
timeout 120 "$mpiexec" -np 2 --oversubscribe --bind-to none "${root[@]}" "$bin/dsv4-train" "${pretrain[@]}" \
  parallel.ep=3 train.out_dir="$work/bad" > "$work/bad.log" 2>&1
rc=$?
set -e
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q "tiny-pretrain.yaml: parallel section: layout dp=2 tp=1 ep=3 (world 2) does not fit model 'tiny': n_routed_experts 8 is not divisible by ep 3" "$work/bad.log" ||
  { cat "$work/bad.log"; echo "FAIL: bad layout not reported"; exit 1; }

echo "layouts: every layout and every resharded resume equals the single-rank run"
