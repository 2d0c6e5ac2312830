#!/usr/bin/env bash
# Data parallelism over MPI on CPU: 5 training steps of the tiny model with the same global batch as
#   (a) 1 rank, 2 rows per micro-batch;  (b) 1 rank, 1 row x 2 accumulated micro-batches;  (c) 2 ranks x 1 row
# must give the same loss sequence (relative difference <= 1e-5: FP32 sums in another order), and (c)'s replicas
# stay bit-identical (checked by the trainer at the checkpoint).
# Usage: train_dp.sh BIN_DIR SOURCE_DIR MPIEXEC
set -euo pipefail
bin=$1; src=$2; mpiexec=$3
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$src"
"$bin/dsv4-prep" --tokenizer data/tokenizer.json --input data/text.jsonl --format text --output "$work/text.h5" > /dev/null
common=(data.train="[$work/text.h5]" data.val= train.threads=1 logging.tensorboard=false train.log_interval=1 train.steps=5
        optim.warmup_steps=1 checkpoint.interval=0 data.seq_len=64)
"$bin/dsv4-train" configs/tiny-pretrain.yaml "${common[@]}" data.micro_batch=2 train.out_dir="$work/a" > /dev/null
"$bin/dsv4-train" configs/tiny-pretrain.yaml "${common[@]}" data.micro_batch=1 data.grad_accum=2 \
  train.out_dir="$work/b" > /dev/null
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
"$mpiexec" -np 2 --oversubscribe --bind-to none "${root[@]}" "$bin/dsv4-train" configs/tiny-pretrain.yaml \
  "${common[@]}" data.micro_batch=1 train.out_dir="$work/c" > "$work/c.log"
losses() { grep -o '"loss/lm": [0-9.e+-]*' "$1/metrics.jsonl" | awk '{print $2}'; }
for run in b c; do
  paste <(losses "$work/a") <(losses "$work/$run") | awk -v run="$run" '
    { d = $1 - $2; if (d < 0) d = -d; r = d / $1; if (r > worst) worst = r; n++
      printf "step %d: %s vs %s (rel %.2e)\n", n, $1, $2, r }
    END { if (n != 5 || worst > 1e-5) { print "FAIL: run " run " differs (worst " worst ")"; exit 1 } }'
done
echo "dp: 1 rank x 2 rows == 1 rank x 2 micro-batches == 2 ranks x 1 row over 5 steps"
