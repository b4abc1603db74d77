#!/usr/bin/env bash
# Makes the README's report figures under docs/report/ (`bash docs/report/make_figures.sh`, about 2 minutes
# on 2 cores): a GPU-cluster plan (Llama 3 8B on 8 H100, pp=4 interleaved with 2 chunks per rank) and a CPU plan
# (llama-tiny on cpu:2, pp=2) launched here for 20 steps with per-phase times, reported against its run.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=docs/report
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
mkdir -p "$out"
paraplan plan llama3-8b --cluster 8xH100-80GB --global-batch 32 --seq-len 4096 \
    --strategy pp=4,vpp=2,schedule=interleaved_1f1b --backend torch -o "$out/llama3-8b-8xH100.plan.json" >/dev/null
paraplan report "$out/llama3-8b-8xH100.plan.json" -o "$out/llama3-8b-8xH100.html"
paraplan plan llama-tiny --cluster cpu:2 --global-batch 8 --seq-len 128 --strategy pp=2 \
    -o "$out/llama-tiny-cpu2.plan.json" >/dev/null
paraplan launch "$out/llama-tiny-cpu2.plan.json" --backend torch --steps 20 --phases --run-dir "$run/run" >/dev/null
paraplan report "$out/llama-tiny-cpu2.plan.json" --run "$run/run" -o "$out/llama-tiny-cpu2.html"
