#!/usr/bin/env bash
# The main job on this machine: profile llama-tiny, plan it for 2 CPU processes, train 20 steps with each backend.
set -euo pipefail
out=${1:-runs/quickstart}
mkdir -p "$out"
# Each of the 2 training processes gets cores/2 threads; profile with the same.
threads=$(( $(nproc) / 2 )); [ "$threads" -ge 1 ] || threads=1
paraplan profile llama-tiny --micro-batches 1,2,4 --seq-len 128 --threads "$threads" -o "$out/profile.json"
paraplan plan llama-tiny --cluster cpu:2 --global-batch 16 --seq-len 128 --profile "$out/profile.json" \
  -o "$out/plan.json"
paraplan launch "$out/plan.json" --backend deepspeed --steps 20 --run-dir "$out/deepspeed"
paraplan launch "$out/plan.json" --backend torch --steps 20 --run-dir "$out/torch"
