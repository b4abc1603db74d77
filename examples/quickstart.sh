#!/usr/bin/env bash
# The main job on this machine: profile llama-tiny, plan it for 2 CPU processes, train 20 steps with each backend.
set -euo pipefail
out=${1:-runs/quickstart}
mkdir -p "$out"
paraplan profile llama-tiny --micro-batches 1,2,4 --seq-len 128 -o "$out/profile.json"
paraplan plan llama-tiny --cluster cpu:2 --global-batch 16 --seq-len 128 --profile "$out/profile.json" \
  -o "$out/plan.json"
paraplan launch "$out/plan.json" --backend deepspeed --steps 20 --run-dir "$out/deepspeed"
paraplan launch "$out/plan.json" --backend torch --steps 20 --run-dir "$out/torch"
