#!/usr/bin/env bash
# Predicted vs measured on ONE GPU: profile a model on it, plan it for that GPU with and without the profile,
# launch the plan with each backend (torch, deepspeed) for a few steps, and write measured against predicted step
# time and peak memory per rank to a Markdown table (benchmarks/gpu_validate.py writes it).
#
#   bash benchmarks/gpu_validate.sh                     # on a GPU machine: writes benchmarks/results/gpu_validate.md
#   bash benchmarks/gpu_validate.sh --dry-run --out /tmp/t.md   # on CPU (CI): same pipeline, llama-tiny, cpu:1
#
# Defaults (GPU): llama-small, bf16, sequence 2048, global batch 32, profiled micro-batches 1,2,4,8, 20 steps per
# run, each step limited to --step-timeout s and the whole script to --deadline s (well under 10 minutes on an
# H100/H200). Without a GPU and without --dry-run it exits 1 before running anything.
#
# Python: $PARAPLAN_PYTHON, else the first of .venv/bin/python and python3 that can run the pipeline (on a GPU
# run: whose torch sees CUDA). paraplan runs from this checkout (PYTHONPATH), installed or not. --wheels DIR first
# installs the wheels (or sdists) in DIR into a temporary directory put on PYTHONPATH, offline: for a machine whose
# Python lacks paraplan's dependencies (pydantic, pulp, highspy, deepspeed, hjson).
#
# The report is written to a temporary file beside --out and renamed: a failure never leaves a half-written one.
# A failed launch is reported as a failed row and the script exits 1; a failed profile or plan stops it (exit 1).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
OUT=""
MODEL=""
SEQ_LEN=""
GLOBAL_BATCH=""
MICRO_BATCHES=""
STEPS=""
CLUSTER=""
WHEELS=""
WORK=""
ARCHIVE=""
STEP_TIMEOUT=240
DEADLINE=540
BACKENDS="torch deepspeed"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; cat <<'EOF'

Options:
  --dry-run              CPU plumbing check: llama-tiny, cpu:1, fp32, seq 64, 2 steps; --out required
  --out FILE             report (default benchmarks/results/gpu_validate.md; required with --dry-run)
  --model M              preset or model file (default llama-small; llama-tiny with --dry-run)
  --seq-len S            (default 2048; 64)
  --global-batch B       (default 32; 1)
  --micro-batches LIST   profiled micro-batch sizes (default 1,2,4,8; 1)
  --steps N              optimizer steps per launch (default 20; 2)
  --cluster C            plan for this cluster instead of 1x<this GPU's catalog name>
  --backends "A B"       (default "torch deepspeed")
  --wheels DIR           install DIR's packages (offline) into a temporary PYTHONPATH entry first
  --work DIR             keep the profile, plans and run directories here (default: a temporary directory, removed)
  --archive FILE         also write a .tar.gz of the work directory (plans, metrics, logs) there
  --step-timeout S       limit per command (default 240)
  --deadline S           limit for the whole script (default 540)
EOF
}

die() { echo "gpu_validate: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --out|--model|--seq-len|--global-batch|--micro-batches|--steps|--cluster|--wheels|--work|--archive|\
--step-timeout|--deadline|--backends)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
                --out) OUT="$2" ;; --model) MODEL="$2" ;; --seq-len) SEQ_LEN="$2" ;;
                --global-batch) GLOBAL_BATCH="$2" ;; --micro-batches) MICRO_BATCHES="$2" ;; --steps) STEPS="$2" ;;
                --cluster) CLUSTER="$2" ;; --wheels) WHEELS="$2" ;; --work) WORK="$2" ;; --archive) ARCHIVE="$2" ;;
                --step-timeout) STEP_TIMEOUT="$2" ;; --deadline) DEADLINE="$2" ;; --backends) BACKENDS="$2" ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; echo >&2; die "unknown argument '$1'" ;;
    esac
done

if [[ $DRY_RUN == 1 ]]; then
    # The committed results file holds a GPU result: a dry run must name its own output.
    [[ -n $OUT ]] || die "--dry-run needs --out FILE (the committed benchmarks/results/gpu_validate.md is for GPU runs)"
    MODEL="${MODEL:-llama-tiny}"; SEQ_LEN="${SEQ_LEN:-64}"; GLOBAL_BATCH="${GLOBAL_BATCH:-1}"
    # One micro-batch size leaves the analytic plan no other choice than the profiled one: two launches, not four.
    MICRO_BATCHES="${MICRO_BATCHES:-1}"; STEPS="${STEPS:-2}"; CLUSTER="${CLUSTER:-cpu:1}"; DTYPE=fp32
else
    OUT="${OUT:-$REPO/benchmarks/results/gpu_validate.md}"
    MODEL="${MODEL:-llama-small}"; SEQ_LEN="${SEQ_LEN:-2048}"; GLOBAL_BATCH="${GLOBAL_BATCH:-32}"
    MICRO_BATCHES="${MICRO_BATCHES:-1,2,4,8}"; STEPS="${STEPS:-20}"; DTYPE=bf16
fi
[[ -d $(dirname "$OUT") ]] || die "--out: no directory $(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
START_S=$SECONDS

# The GPU guard comes before anything slow: nvidia-smi is the cheap test, torch's view of it the one that counts.
if [[ $DRY_RUN == 0 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        die "no NVIDIA GPU found (nvidia-smi lists none). Run this on a GPU machine, or pass --dry-run --out FILE to check the pipeline on CPU."
    fi
fi

WORK_IS_TEMP=0
if [[ -z $WORK ]]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_validate.XXXXXX")"
    WORK_IS_TEMP=1
fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
cleanup() { if [[ $WORK_IS_TEMP == 1 ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

if [[ -n $WHEELS ]]; then
    [[ -d $WHEELS ]] || die "--wheels: no directory $WHEELS"
fi

# Pick the interpreter. A candidate must import paraplan's dependencies (after --wheels, with them on the path)
# and, for a GPU run, see CUDA.
pick_python() {
    local candidates=() py
    if [[ -n ${PARAPLAN_PYTHON:-} ]]; then candidates=("$PARAPLAN_PYTHON"); else
        [[ -x $REPO/.venv/bin/python ]] && candidates+=("$REPO/.venv/bin/python")
        command -v python3 >/dev/null 2>&1 && candidates+=("$(command -v python3)")
    fi
    local check='import torch, pydantic, pulp, typer'
    [[ $DRY_RUN == 0 ]] && check="$check; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
    for py in "${candidates[@]}"; do
        if [[ -n $WHEELS ]]; then
            local site="$WORK/site-$(basename "$(dirname "$(dirname "$py")")")-$(basename "$py")"
            if [[ ! -d $site ]]; then
                # --no-build-isolation: an sdist (deepspeed publishes only one) builds with this Python's setuptools.
                "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
                    --disable-pip-version-check --target "$site" "$WHEELS"/* >"$WORK/pip-install.log" 2>&1 \
                    || { echo "gpu_validate: installing $WHEELS with $py failed:" >&2; tail -5 "$WORK/pip-install.log" >&2; continue; }
            fi
            if PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "$check" >/dev/null 2>&1; then
                PY="$py"; SITE="$site"; return 0
            fi
        elif PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "$check" >/dev/null 2>&1; then
            PY="$py"; SITE=""; return 0
        fi
    done
    return 1
}
PY=""; SITE=""
if ! pick_python; then
    if [[ $DRY_RUN == 0 ]]; then
        die "an NVIDIA GPU is present, but no Python here has paraplan's dependencies and a torch that sees CUDA (tried: ${PARAPLAN_PYTHON:-$REPO/.venv/bin/python, python3}); set PARAPLAN_PYTHON or pass --wheels DIR"
    fi
    die "no Python with paraplan's dependencies (tried: ${PARAPLAN_PYTHON:-$REPO/.venv/bin/python, python3}); set PARAPLAN_PYTHON"
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR; reuse the repo's cache (PLATFORM.md) when there is one.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/build/torch_extensions}"
if [[ $DRY_RUN == 1 ]]; then
    export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU pipeline even on a machine with a GPU
    THREADS="$("$PY" -c 'import os; print(os.cpu_count() or 1)')"
fi

if [[ -z $CLUSTER ]]; then
    CLUSTER="$("$PY" "$REPO/benchmarks/gpu_validate.py" cluster)" || die "cannot map this GPU to paraplan's catalog; pass --cluster"
fi

: >"$WORK/commands.txt"
: >"$WORK/runs.tsv"

# run_step NAME CMD...: run with the step timeout (capped by what is left of the deadline), output to
# WORK/NAME.log, the command recorded (with WORK written as $WORK) in commands.txt. Returns the command's status.
run_step() {
    local name="$1"; shift
    local left=$((DEADLINE - (SECONDS - START_S)))
    local limit=$((STEP_TIMEOUT < left ? STEP_TIMEOUT : left))
    if ((limit <= 0)); then echo "gpu_validate: deadline of ${DEADLINE}s reached before '$name'" >&2; return 124; fi
    local shown="$*"
    shown="${shown//"$PY -m paraplan"/paraplan}"
    shown="${shown//"$WORK"/\$WORK}"
    echo "$shown" >>"$WORK/commands.txt"
    echo "[$((SECONDS - START_S))s] $name: $shown" >&2
    local rc=0
    timeout --kill-after=20 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
    if ((rc != 0)); then
        if ((rc == 124)); then echo "gpu_validate: '$name' timed out after ${limit}s" >&2; fi
        echo "gpu_validate: '$name' failed (exit $rc); last lines of its log:" >&2
        tail -15 "$WORK/$name.log" >&2
    fi
    return $rc
}

PARAPLAN=("$PY" -m paraplan)
PROFILE_ARGS=(--micro-batches "$MICRO_BATCHES" --seq-len "$SEQ_LEN" --dtype "$DTYPE")
if [[ $DRY_RUN == 1 ]]; then
    # Plumbing only: one timed repeat, no link measurement (it starts two more processes), all cores for cpu:1.
    PROFILE_ARGS+=(--threads "$THREADS" --warmup 1 --repeats 1 --no-links)
fi
PLAN_ARGS=(--cluster "$CLUSTER" --global-batch "$GLOBAL_BATCH" --seq-len "$SEQ_LEN" --dtype "$DTYPE" --top 1)

run_step profile "${PARAPLAN[@]}" profile "$MODEL" "${PROFILE_ARGS[@]}" -o "$WORK/profile.json" || exit 1
run_step plan_profile "${PARAPLAN[@]}" plan "$MODEL" "${PLAN_ARGS[@]}" --profile "$WORK/profile.json" \
    -o "$WORK/plan_profile.json" || exit 1
run_step plan_analytic "${PARAPLAN[@]}" plan "$MODEL" "${PLAN_ARGS[@]}" -o "$WORK/plan_analytic.json" || exit 1

# The analytic plan is launched only when it chose another strategy; otherwise its rows reuse the profiled runs.
PLANS=(profile)
if "$PY" "$REPO/benchmarks/gpu_validate.py" same-strategy "$WORK/plan_profile.json" "$WORK/plan_analytic.json"; then
    touch "$WORK/same_strategy"
else
    PLANS+=(analytic)
fi
for label in "${PLANS[@]}"; do
    for backend in $BACKENDS; do
        rc=0
        run_step "launch_${label}_$backend" "${PARAPLAN[@]}" launch "$WORK/plan_$label.json" --backend "$backend" \
            --steps "$STEPS" --run-dir "$WORK/run_${label}_$backend" || rc=$?
        printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$WORK/plan_$label.json" "$backend" "$WORK/run_${label}_$backend" \
            "$rc" >>"$WORK/runs.tsv"
    done
done
if [[ -e $WORK/same_strategy ]]; then
    for backend in $BACKENDS; do
        rc="$(awk -F'\t' -v b="$backend" '$1 == "profile" && $3 == b {print $5}' "$WORK/runs.tsv")"
        printf '%s\t%s\t%s\t%s\t%s\n' analytic "$WORK/plan_analytic.json" "$backend" "$WORK/run_profile_$backend" \
            "$rc" >>"$WORK/runs.tsv"
    done
fi

rc=0
"$PY" "$REPO/benchmarks/gpu_validate.py" report --work "$WORK" --out "$OUT" --model "$MODEL" --cluster "$CLUSTER" \
    --dtype "$DTYPE" --micro-batches "$MICRO_BATCHES" --global-batch "$GLOBAL_BATCH" --seq-len "$SEQ_LEN" \
    --steps "$STEPS" --date "$(date -u +%Y-%m-%dT%H:%MZ)" --elapsed-s "$((SECONDS - START_S))" \
    $([[ $DRY_RUN == 1 ]] && echo --dry-run) || rc=$?
if [[ -n $ARCHIVE ]]; then
    tar -czf "$ARCHIVE" -C "$(dirname "$WORK")" --exclude='site-*' "$(basename "$WORK")" || true
fi
echo "gpu_validate: wrote $OUT in $((SECONDS - START_S)) s" >&2
exit $rc
