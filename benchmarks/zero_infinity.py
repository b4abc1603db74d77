"""ZeRO-Infinity offload: paraplan's predictions against the figures the ZeRO-Infinity paper states.

Usage:
    python benchmarks/zero_infinity.py [--data PATH] [--out PATH]

Rajbhandari et al., "ZeRO-Infinity: Breaking the GPU Memory Wall for Extreme Scale Deep Learning", SC'21
(arXiv 2104.07857). Each row of ``data/zero_infinity_runs.jsonl`` is a configuration the paper (or a note quoting
it) states, with its source; ``data/dgx2.yaml`` / ``data/dgx2_x32.yaml`` are the DGX-2 clusters, each figure cited.
What the reachable sources do not state (model shapes, batch per GPU, sequence length, NVMe bandwidth, CPU Adam
rate) is an assumption named in the row or the cluster file, never fitted to the published number.

Rule for the strategy of every row (one rule, not per row): ZeRO-3 over all GPUs (dp = GPUs, tp = pp = 1; the paper
trains without model parallelism), full activation recomputation, unfused attention (2021 kernels), the offload tiers
the row states or assumes, one micro-batch per step (no gradient accumulation), and the largest micro-batch of
1, 2, 4, ..., 32 that paraplan predicts fits in device memory (1 when none does, flagged).

FLOP convention: the paper's count is not stated in the sources reached; "25 PF on 512 GPUs = 40% of peak" gives
48.8 TFLOP/s per GPU = 39% of the V100's 125 TFLOP/s, so its TFLOP/s are compared with paraplan's hardware FLOPs
(recomputed forward included, Narayanan et al. SC'21 eq. 3, the count the ZeRO papers' Megatron-based GPT runs
used). Model FLOPs are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from paraplan.catalog import load_cluster_spec
from paraplan.cost_models.estimate import StrategyEstimate, StrategySpec, estimate_strategy
from paraplan.errors import ParaplanError
from paraplan.planner.search import search_plans
from paraplan.types import ClusterSpec, ModelSpec, StrategyOverride, TrainSpec
from paraplan.units import GiB

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "zero_infinity_runs.jsonl"
DEFAULT_OUT = HERE / "results" / "zero_infinity.md"
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
ACCUM = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NVME_SWEEP_BYTES_PER_S = (12.5e9, 25e9, 50e9, 100e9)
CPU_ADAM_SWEEP_PARAMS_PER_S = (1e9, 4e9)
TB = 1e12


def build_model(row: dict) -> ModelSpec:
    """GPT block with ffn 4h and MHA, the row's (assumed) shape; vocabulary 50257 (GPT-2 BPE)."""
    h = row["hidden"]
    return ModelSpec(name=row["id"], family="gpt", n_layers=row["n_layers"], hidden=h, ffn_hidden=4 * h,
                     n_heads=row["n_heads"], n_kv_heads=row["n_heads"], vocab=row["vocab"],
                     max_seq_len=row["seq_len"])


def strategy(row: dict, micro_batch: int) -> StrategySpec:
    return StrategySpec(dp=row["n_gpus"], tp=1, pp=1, micro_batch_size=micro_batch, zero_stage=3,
                        offload_optimizer=row["offload_optimizer"], offload_param=row["offload_param"],
                        recompute="full", attention="unfused")


def estimate(row: dict, cluster: ClusterSpec, micro_batch: int, accum: int = 1) -> StrategyEstimate:
    train = TrainSpec(global_batch=row["n_gpus"] * micro_batch * accum, seq_len=row["seq_len"], dtype="fp16")
    return estimate_strategy(build_model(row), cluster, train, strategy(row, micro_batch))


def pick_micro_batch(row: dict, cluster: ClusterSpec) -> tuple[int, bool]:
    """The largest micro-batch predicted to fit in device memory, and whether any fits."""
    fitting = [mb for mb in MICRO_BATCHES if estimate(row, cluster, mb).fits]
    return (max(fitting), True) if fitting else (1, False)


def sequences_to_reach(row: dict, cluster: ClusterSpec, micro_batch: int) -> str:
    """Sequences per GPU per step (micro-batch x accumulation) at which the predicted hardware TFLOP/s first reach
    the published value; the reader's measure of how far the assumed batch is from what the paper needed."""
    target = row["measured_tflops_per_gpu"]
    if target is None:
        return "-"
    for a in ACCUM:
        if estimate(row, cluster, micro_batch, a).hardware_tflops_per_device >= target:
            return str(micro_batch * a)
    return f"> {micro_batch * ACCUM[-1]}"


def main_rows(rows: list[dict], clusters: dict[str, ClusterSpec]) -> list[str]:
    out = ["| row | GPUs | params (stated) | offload opt / param | mb | published TFLOP/s/GPU | predicted hw "
           "TFLOP/s/GPU | predicted model TFLOP/s/GPU | ratio hw/published | step s (optimizer+offload s) | "
           "device GiB (of 32) | host TB/node (of 1.5) | NVMe TB/node (of 30) | seq/GPU/step to reach published | "
           "binding |", "|" + "---|" * 15]
    for row in rows:
        c = clusters[row["id"]]
        mb, fits = pick_micro_batch(row, c)
        e = estimate(row, c, mb)
        pub = row["measured_tflops_per_gpu"]
        pub_s = "not found" if pub is None else f"{row['measured_relation']} {pub:g}"
        ratio = "-" if pub is None else f"{e.hardware_tflops_per_device / pub:.2f}"
        n = c.devices_per_node
        out.append(
            f"| {row['id']} | {row['n_gpus']} | {row['params_b_stated']:g}B | {row['offload_optimizer']} / "
            f"{row['offload_param']} | {mb}{'' if fits else ' (none fits)'} | {pub_s} | "
            f"{e.hardware_tflops_per_device:.1f} | {e.model_tflops_per_device:.1f} | {ratio} | "
            f"{e.step_time_s:,.0f} ({e.optimizer_s:,.0f}) | {e.peak_memory_bytes / GiB:.1f} | "
            f"{e.host_bytes * n / TB:.2f} | {e.nvme_bytes * n / TB:.1f} | {sequences_to_reach(row, c, mb)} | "
            f"{e.binding} |")
    return out


def sensitivity(rows: list[dict], clusters: dict[str, ClusterSpec]) -> list[str]:
    """Predicted hardware TFLOP/s per GPU of the rows with a published number, over the two assumed figures."""
    head = [f"NVMe {bw / 1e9:g} GB/s, CPU Adam {r / 1e9:g}e9/s" for bw in NVME_SWEEP_BYTES_PER_S
            for r in CPU_ADAM_SWEEP_PARAMS_PER_S]
    out = ["| row | published | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 2)]
    for row in rows:
        if row["measured_tflops_per_gpu"] is None:
            continue
        base = clusters[row["id"]]
        mb, _ = pick_micro_batch(row, base)
        cells = []
        for bw in NVME_SWEEP_BYTES_PER_S:
            for rate in CPU_ADAM_SWEEP_PARAMS_PER_S:
                c = base.model_copy(update={"nvme_bandwidth_bytes_per_s": bw, "cpu_adam_params_per_s": rate})
                cells.append(f"{estimate(row, c, mb).hardware_tflops_per_device:.1f}")
        out.append(f"| {row['id']} (mb {mb}) | {row['measured_tflops_per_gpu']:g} | " + " | ".join(cells) + " |")
    return out


def planner_pick(row: dict, cluster: ClusterSpec, micro_batch: int) -> list[str]:
    """What ``search_plans(backend="deepspeed")`` picks for the row at its batch (dp x micro-batch sequences)."""
    train = TrainSpec(global_batch=row["n_gpus"] * micro_batch, seq_len=row["seq_len"], dtype="fp16")
    out = [f"search_plans({row['id']}, {cluster.name}, global batch {train.global_batch}, seq {train.seq_len}, "
           "fp16, backend='deepspeed', top_k=3, override zero=3):", ""]
    try:
        plans = search_plans(build_model(row), cluster, train, override=StrategyOverride(zero_stage=3), top_k=3,
                             backend="deepspeed")
    except ParaplanError as exc:
        return out + [f"    no plan: {exc}"]
    for p in plans:
        s, pr = p.strategy, p.predicted
        rc = sum(st.recompute_blocks for st in s.stages)
        out.append(f"    dp={s.dp} tp={s.tp} pp={s.pp} mb={s.micro_batch_size} accum={s.grad_accum} "
                   f"zero={s.zero_stage} offload opt/param={s.offload_optimizer}/{s.offload_param} "
                   f"recompute blocks={rc}: step {pr.step_time_s:,.1f} s, MFU {pr.mfu:.3f}, peak "
                   f"{pr.peak_memory_bytes / GiB:.1f} GiB, binding: {pr.binding}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    clusters = {r["id"]: load_cluster_spec(str(args.data.parent / r["cluster_file"])) for r in rows}
    one_t = next(r for r in rows if r["id"] == "zi_1T_1node")
    text = [
        "# ZeRO-Infinity: paraplan's predictions against the paper's figures", "",
        "Produced by `.venv/bin/python benchmarks/zero_infinity.py` (data: benchmarks/data/zero_infinity_runs.jsonl,"
        " clusters: benchmarks/data/dgx2.yaml, dgx2_x32.yaml).", "",
        "Strategy rule (every row): ZeRO-3, dp = GPUs, tp = pp = 1, full recomputation, unfused attention, fp16, "
        "seq 1024 (assumed), no gradient accumulation, the largest micro-batch predicted to fit. Published TFLOP/s "
        "are compared with predicted *hardware* TFLOP/s (recomputation counted); model TFLOP/s shown beside. Host "
        "and NVMe columns are per node (paraplan's per-device figures x 16).", "",
        *main_rows(rows, clusters), "",
        "## Sensitivity to the two assumed cluster figures (predicted hardware TFLOP/s per GPU)", "",
        *sensitivity(rows, clusters), "",
        "## Planner", "", "```", *planner_pick(one_t, clusters[one_t["id"]], 4), "```", "",
        "## Sources", "",
        *[f"- {r['id']}: {r['source']} ({r['provenance']}). Offload: {r['offload_stated']}. Shape: "
          f"{r['dims_source']}. Notes: {r['notes']}" for r in rows],
        f"- clusters: {'; '.join(f'{k}: {v}' for k, v in clusters[one_t['id']].sources.items())}",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
