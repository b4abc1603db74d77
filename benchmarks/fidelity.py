"""Cost-model fidelity: predict every published run in ../shared/data/published_runs.jsonl and compare.

Usage:
    python benchmarks/fidelity.py [--data PATH] [--markdown] [--json OUT]
    python benchmarks/fidelity.py --moe [--markdown] [--write]   (the Mixture-of-Experts table: moe_fidelity.py)

For each row the model, cluster and strategy the source states go into paraplan's estimator
(:func:`paraplan.cost_models.estimate.estimate_strategy`, the cost model ``paraplan plan`` optimizes); the
prediction is compared with the measurement in the source's own units and FLOP convention (like with like):
    - Narayanan et al. SC'21 Tables 1-2 count FLOPs with the recomputed forward (their eq. 3): compared with our
      hardware TFLOP/s per GPU (full recomputation, the same eq. 3);
    - Megatron-LM README (H100): model TFLOP/s per GPU (MFU where only MFU is given), our model FLOPs;
    - llm-foundry: MFU in its own count (6 N tokens + attention with N its exact NumParams, position table
      included: up to 1.1% above ours at 64k tokens), see ``llmfoundry_flops_per_step``;
    - torchtitan: tokens/s per GPU on a 500 W HBM2e H100 whose peak is not stated, so only ratios within the
      source are compared (see ``torchtitan_reference``).
One model (paraplan's cost model) and one device catalog (paraplan.catalog + cost_models.efficiency) serve all rows.
Every device constant cites a published measurement; the one calibrated constant is the cost model's
FRAMEWORK_EFFICIENCY (the fraction of the kernel-level model real frameworks achieve), fitted across all sources and
checked by leaving each source out in turn (``--calibrate``); ``--framework-efficiency 1`` shows the kernel model
alone. No per-row constant; nothing is fitted to any single row.

Unstated settings follow ONE default rule, applied to every row (``DEFAULT_RULE``): a setting the row leaves open
takes the value its framework used by default at the time (``FRAMEWORKS``, with sources); where the framework has
none, the rule's listed fallback (micro-batch 1, no interleaving, tp up to a node then pp, the least recomputation
that fits in device memory per paraplan's memory model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from paraplan.catalog import gpu_cluster
from paraplan.cost_models import transformer as tf
from paraplan.cost_models.estimate import StrategyEstimate, StrategySpec, estimate_strategy
from paraplan.types import ClusterSpec, ModelSpec, TrainSpec
from paraplan.units import GiB

# A copy of ../shared/data/published_runs.jsonl (see benchmarks/data/README.md), so a fresh clone reproduces the table.
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "published_runs.jsonl"
GOAL_MEDIAN, GOAL_STATED = 0.05, 0.12

DEFAULT_RULE = [  # the one rule for settings a row leaves unstated
    "settings a row does not state take its framework's default of the time (FRAMEWORKS below)",
    "micro-batch unstated: 1; virtual pipeline stages unstated: 1 (no interleaving)",
    "tp/pp split unstated: tp up to the GPUs of a node, then the fewest pipeline stages that fit in memory "
    "(Narayanan et al. SC'21 takeaway #1)",
    "recomputation unstated: the framework default (none), raised to selective, then full, only if the "
    "estimate does not fit in device memory",
    "model dimensions unstated: the named model's published configuration; GPT-style ffn = 4 h, kv heads = heads; "
    "sequence length unstated: the framework's training config (torchtitan: 8192)",
]


@dataclass(frozen=True)
class Framework:
    """Defaults of one training framework at the time of a source (each with why)."""

    name: str
    attention: str
    sequence_parallel: bool
    zero_stage: int
    overlap_dp: bool
    overlap_tp: bool
    why: str
    backend: str | None = None  # paraplan.cost_models.backend_profiles profile of the framework's conventions


FRAMEWORKS = {
    "megatron_2021": Framework(
        "Megatron-LM (2021)", "unfused", False, 0, False, False,
        "no FlashAttention (2022) or sequence parallelism (2022) yet; default --DDP-impl local all-reduces "
        "gradients after the backward (no overlap); no distributed optimizer", "megatron_2021"),
    "deepspeed_zero3_2021": Framework(
        "Megatron-LM model + DeepSpeed ZeRO-3 (2021)", "unfused", False, 3, False, False,
        "Megatron's 2021 attention; DeepSpeed's ZeRO-3 of spring 2021 did not overlap its parameter all-gathers: "
        "'the async version is not async at all, because each all_gather calls torch.cuda.synchronize()' "
        "(deepspeedai/DeepSpeed PR #1188, June 2021, on v0.3.16; issue #1174: 'ZeRO3 is slow, even with nvlink "
        "for all-gather'); the gradient reduce-scatter is assumed not overlapped either (overlap_comm: "
        "ZERO_OPTIMIZATION_OVERLAP_COMM_DEFAULT = False in deepspeed/runtime/zero/constants.py; the runs' "
        "DeepSpeed config is not published), so no ZeRO traffic hides behind compute", "deepspeed_2021"),
    "megatron_core_2024": Framework(
        "Megatron-Core r0.8 (2024)", "flash2", True, 1, True, True,
        "the README states --overlap-grad-reduce, --overlap-param-gather, --tp-comm-overlap: param-gather "
        "overlap needs the distributed optimizer (ZeRO-1), tp-comm-overlap needs sequence parallelism; "
        "TransformerEngine fused (flash) attention", "megatron"),
    "llmfoundry_2023": Framework(
        "llm-foundry / Composer FSDP (2023)", "flash1", False, 3, True, False,
        "Triton FlashAttention ('triton' attn_impl, stated by the row notes); FSDP prefetch overlaps "
        "all-gathers and reduce-scatters"),
    "torchtitan_2024": Framework(
        "torchtitan (2024-25)", "flash2", True, 3, True, False,
        "FSDP2 with prefetch; torch SDPA (FlashAttention-2 backend); its TP plan shards norms with "
        "SequenceParallel (sequence parallelism on when tp > 1); async TP only where the row says so", "torchtitan"),
}
GROUP_FRAMEWORK = {
    "megatron_sc21_table1": "megatron_2021", "megatron_sc21_table2": "megatron_2021",
    "megatron_lm_readme_h100": "megatron_core_2024", "llmfoundry_mpt_benchmarks": "llmfoundry_2023",
    "torchtitan_202412": "torchtitan_2024", "torchtitan_asynctp_2025-06": "torchtitan_2024",
}
# Published configurations of models a row names without giving all dimensions.
KNOWN_MODELS = {
    "gpt3": dict(n_layers=96, hidden=12288, n_heads=96, why="GPT-3 175B, Brown et al. 2020 Table 2.1"),
    "llama3.1": dict(vocab=128256, why="Llama 3.1 config.json: vocab_size 128256"),
}
TORCHTITAN_SEQ_LEN = 8192  # train_configs/llama3_*.toml at the benchmarks' torchtitan commit (row 'derived')


def device_name(gpu_type: str) -> str:
    g = gpu_type.upper()
    if "A100" in g:
        return "A100-40GB" if "40GB" in g else "A100-80GB"
    if "H100" in g:
        return "H100-80GB"
    raise ValueError(f"no catalog device for {gpu_type}")


@dataclass
class Case:
    """One row turned into estimator inputs, with the defaults that were applied."""

    row: dict
    spec: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    strategy: StrategySpec
    defaults: list[str] = field(default_factory=list)
    fully_stated: bool = False


def _derived(row: dict, key: str):
    value = row.get(key)
    if value is None:
        value = (row.get("derived") or {}).get(key, {}).get("value")
    return value


def row_model(row: dict, defaults: list[str]) -> ModelSpec:
    llama = "llama" in (row.get("model_name") or "").lower()
    dims = {k: row.get(k) for k in ("n_layers", "hidden", "n_heads", "ffn_hidden", "n_kv_heads", "vocab")}
    if dims["n_layers"] is None and "GPT-3" in (row.get("model_name") or ""):
        known = KNOWN_MODELS["gpt3"]
        dims.update({k: v for k, v in known.items() if k != "why"})
        defaults.append(f"dims: {known['why']}")
    if dims["vocab"] is None and llama:
        dims["vocab"] = KNOWN_MODELS["llama3.1"]["vocab"]
        defaults.append("vocab: " + KNOWN_MODELS["llama3.1"]["why"])
    if dims["ffn_hidden"] is None:
        dims["ffn_hidden"] = 4 * dims["hidden"]
    if dims["n_kv_heads"] is None:
        dims["n_kv_heads"] = dims["n_heads"]
    return ModelSpec(name=row["id"], family="llama" if llama else "gpt", tied_embeddings=not llama,
                     max_seq_len=max(row.get("seq_len") or TORCHTITAN_SEQ_LEN, 2048), **dims)


def row_cluster(row: dict) -> ClusterSpec:
    n, per_node = row["n_gpus"], row.get("gpus_per_node") or 8
    cluster = gpu_cluster(max(1, n // per_node), min(n, per_node), device_name(row["gpu_type"]))
    if row.get("gpu_mem_gb") and "96GB" in row["gpu_type"].replace(" ", ""):
        dev = cluster.device.model_copy(update={"memory_bytes": row["gpu_mem_gb"] * 1e9})
        cluster = cluster.model_copy(update={"device": dev})
    return cluster


def framework_of(row: dict) -> Framework:
    """The framework (and its defaults of the time) a row ran on."""
    if row["source_group"] == "megatron_sc21_table2" and row.get("zero_stage") == 3:
        return FRAMEWORKS["deepspeed_zero3_2021"]
    return FRAMEWORKS[GROUP_FRAMEWORK[row["source_group"]]]


def _recompute(row: dict) -> str | None:
    """The recomputation a row states, or None. SC'21 (both tables) states it through its FLOP convention: eq. 3
    counts the recomputed forward of every layer, as the paper's runs recompute activations."""
    if row["source_group"].startswith("megatron_sc21"):
        return "full"
    text = (row.get("recompute") or "").lower()
    for mode in ("full", "selective", "none"):
        if text.startswith(mode):
            # torchtitan's "selective activation checkpointing" is its op-level policy: the benchmarks' configs set
            # [activation_checkpoint] mode = "selective", selective_ac_option = "op"
            # (torchtitan/train_configs/llama3_*.toml at the benchmarks' commit).
            return "op" if mode == "selective" and row["source_group"].startswith("torchtitan") else mode
    return None


def build_case(row: dict, framework_efficiency: float | None = None) -> Case:
    """Row -> estimator inputs, applying DEFAULT_RULE to what the row leaves unstated.

    ``framework_efficiency`` overrides the cost model's FRAMEWORK_EFFICIENCY (calibration only).
    """
    defaults: list[str] = []
    fw = framework_of(row)
    spec = row_model(row, defaults)
    cluster = row_cluster(row)
    seq = row.get("seq_len") or _derived(row, "seq_len_config_default") or TORCHTITAN_SEQ_LEN
    if row.get("seq_len") is None:
        defaults.append(f"seq_len {seq}: framework config default")
    n = row["n_gpus"]
    tp, pp = row.get("tp"), row.get("pp")
    if tp is None and row.get("model_parallel_size") == 1:
        tp, pp = 1, 1
    mb = row.get("micro_batch") or (row.get("other_measured") or {}).get("local_batch_size")
    if mb is None:
        mb = 1
        defaults.append("micro-batch 1")
    gb = row.get("global_batch") or _derived(row, "global_batch")
    zero = row.get("zero_stage")
    if zero is None:
        zero = 3 if row.get("fsdp") else fw.zero_stage
    recompute = _recompute(row)
    strategy = StrategySpec(dp=1, tp=tp or 1, pp=pp or 1, micro_batch_size=mb, vpp=row.get("vp") or 1,
                            sequence_parallel=fw.sequence_parallel if row.get("sp") is None else bool(row["sp"]),
                            recompute=recompute or "none", zero_stage=zero, attention=fw.attention,
                            overlap_dp=fw.overlap_dp, overlap_tp=fw.overlap_tp or _async_tp(row), backend=fw.backend,
                            elementwise="eager" if _eager(row) else "fused")
    if framework_efficiency is not None:
        strategy = replace(strategy, framework_efficiency=framework_efficiency)
    if row.get("vp") is None and (pp or 1) > 1:
        defaults.append("vpp 1")
    train = TrainSpec(global_batch=gb, seq_len=seq, dtype="bf16")
    case = Case(row, spec, cluster, train, strategy, defaults)
    if tp is None or pp is None:
        _choose_split(case, row.get("model_parallel_size"))
    case.strategy = replace(case.strategy, dp=n // (case.strategy.tp * case.strategy.pp))
    if recompute is None:
        _least_recompute(case)
    case.fully_stated = not case.defaults and _is_stated(row)
    return case


def _eager(row: dict) -> bool:
    """torchtitan runs its blocks in eager mode unless the row says torch.compile (training.compile defaults to
    false; async TP requires compile): the element-wise kernels then run unfused (CostOptions.elementwise)."""
    text = f"{row.get('framework', '')} {(row.get('other_measured') or {}).get('techniques', '')}".lower()
    return row["source_group"].startswith("torchtitan") and "compile" not in text


def _async_tp(row: dict) -> bool:
    """torchtitan's async TP overlaps the TP collectives with the GEMMs (stated per row as the variant)."""
    return (row.get("other_measured") or {}).get("variant", "").lower().startswith("async")


def _is_stated(row: dict) -> bool:
    keys = ("tp", "pp", "micro_batch", "recompute", "seq_len")
    return all(row.get(k) is not None for k in keys) and (row["pp"] == 1 or row.get("vp") is not None)


def _choose_split(case: Case, mp_size: int | None) -> None:
    """tp up to a node, then the fewest pipeline stages (dividing the layers and the GPUs) that fit."""
    n, per_node, L = case.cluster.world_size, case.cluster.devices_per_node, case.spec.n_layers or 0
    tp = min(per_node, mp_size or per_node)
    options = [mp_size // tp] if mp_size else [p for p in range(1, L + 1) if L % p == 0 and (n // tp) % p == 0]
    pp = options[-1]
    for pp in options:
        dp = n // (tp * pp)
        if case.train.global_batch % (dp * case.strategy.micro_batch_size):
            continue
        trial = replace(case.strategy, tp=tp, pp=pp, dp=dp, recompute="none")
        if estimate_strategy(case.spec, case.cluster, case.train, trial).fits or pp == options[-1]:
            break
    case.strategy = replace(case.strategy, tp=tp, pp=pp)
    case.defaults.append(f"tp {tp} / pp {pp} (split rule)")


def _least_recompute(case: Case) -> None:
    for mode in ("none", "selective", "full"):
        trial = replace(case.strategy, recompute=mode)
        if estimate_strategy(case.spec, case.cluster, case.train, trial).fits:
            break
    case.strategy = trial
    case.defaults.append(f"recompute {trial.recompute} (least that fits)")


@dataclass
class Result:
    id: str
    group: str
    metric: str
    measured: float
    predicted: float
    fully_stated: bool
    defaults: list[str]
    peak_memory_gib: float
    capacity_gib: float
    strategy: str
    note: str = ""
    reason: str = ""

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def _metric(case: Case, est: StrategyEstimate) -> tuple[str, float, float]:
    row = case.row
    group = row["source_group"]
    if group.startswith("megatron_sc21"):
        return "hw TFLOP/s/GPU (eq.3)", row["measured_tflops_per_gpu"], est.hardware_tflops_per_device
    if group == "megatron_lm_readme_h100":
        if row.get("measured_tflops_per_gpu") is not None:
            return "model TFLOP/s/GPU", row["measured_tflops_per_gpu"], est.model_tflops_per_device
        return "MFU", row["mfu"], est.mfu
    if group == "llmfoundry_mpt_benchmarks":
        return "MFU", row["mfu"], est.mfu * llmfoundry_flops_per_step(case) / est.model_flops_per_step
    return "tokens/s/GPU", row["tokens_per_s_per_gpu"], est.tokens_per_s / case.cluster.world_size


def llmfoundry_flops_per_step(case: Case) -> float:
    """Model FLOPs of one step as llm-foundry's MFU counts them (its benchmarking README, "MFU"):
    ``B (6 N s + 12 L h s^2)`` with ``N`` the row's exact NumParams.

    Its ``N`` includes the learned position-embedding table (``s h``, no matmul FLOPs) and the norm weights, so
    its count exceeds ours (``model_flops_per_step``) by up to 1.1% at 64k tokens; the predicted MFU is put in the
    source's convention (like with like). Without a stated NumParams, ours stands in.
    """
    n_params = (case.row.get("other_measured") or {}).get("num_params_exact")
    if not n_params:
        return tf.model_flops_per_step(case.spec, case.train.global_batch, case.train.seq_len)
    s, L, h = case.train.seq_len, case.spec.n_layers or 0, case.spec.hidden or 0
    return case.train.global_batch * (6.0 * n_params * s + 12.0 * L * h * s * s)


def torchtitan_reference(row: dict, rows: list[dict]) -> dict | None:
    """The row a torchtitan row is compared against (ratio), or None for a reference row itself.

    The 500 W HBM2e H100 has no stated peak, so only ratios within one source are compared: the same techniques
    at the smallest scale (Dec 2024 tables), and vanilla TP for async TP (2025 tables).
    """
    group = row["source_group"]
    if group == "torchtitan_202412":
        tech = (row.get("other_measured") or {}).get("techniques")
        same = [r for r in rows if r["source_group"] == group and
                (r.get("other_measured") or {}).get("techniques") == tech]
        ref = min(same, key=lambda r: r["n_gpus"])
    else:
        ref = next(r for r in rows if r["source_group"] == group and r["model_name"] == row["model_name"]
                   and "vanilla" in r["id"])
    return None if ref is row else ref


def evaluate_row(row: dict, framework_efficiency: float | None = None) -> Result:
    """Estimate one row and pair the prediction with the measurement it is compared to."""
    case = build_case(row, framework_efficiency)
    est = estimate_strategy(case.spec, case.cluster, case.train, case.strategy)
    metric, measured, predicted = _metric(case, est)
    st = case.strategy
    desc = (f"tp{st.tp} pp{st.pp} dp{st.dp} mb{st.micro_batch_size}"
            + (f" vpp{st.vpp}" if st.vpp > 1 else "") + (" sp" if st.sequence_parallel and st.tp > 1 else "")
            + f" z{st.zero_stage} rc:{st.recompute} {st.attention}")
    return Result(row["id"], row["source_group"], metric, measured, predicted, case.fully_stated, case.defaults,
                  est.peak_memory_bytes / GiB, est.memory_capacity_bytes / GiB, desc)


def evaluate(rows: list[dict], framework_efficiency: float | None = None) -> list[Result]:
    """Every row's result; torchtitan rows become ratios to their reference row (see torchtitan_reference)."""
    results = [evaluate_row(row, framework_efficiency) for row in rows]
    by_id = {r.id: r for r in results}
    absolute = {r.id: (r.measured, r.predicted) for r in results}
    for res, row in zip(results, rows):
        if res.group.startswith("torchtitan"):
            ref = torchtitan_reference(row, rows)
            if ref is None:
                res.metric, res.note = "reference", "reference row of its ratios"
                continue
            ref_measured, ref_predicted = absolute[by_id[ref["id"]].id]
            res.note = f"ratio to {ref['id']}; absolute {res.predicted:.0f} tokens/s/GPU at the H100 SXM peak"
            res.metric = "tokens/s ratio"
            res.measured, res.predicted = res.measured / ref_measured, res.predicted / ref_predicted
    if framework_efficiency is None:  # REASONS describe the shipped model's residuals only
        for res, row in zip(results, rows):
            res.reason = miss_reason(res, row)
    return results


# Why rows miss the 12% goal, by cause (documentation of the residuals; nothing here changes a prediction).
REASONS = {
    "sc21_zero3": "DeepSpeed ZeRO-3 (2021), priced without overlap (its parameter all-gathers synchronized, see "
                  "FRAMEWORKS) and with the deepspeed_2021 cost profile: one all-gather per parameter tensor (12 per "
                  "GPT layer, partition_parameters.py of 2021) at NCCL's per-ring-step latency (767 steps at 768 "
                  "GPUs, ~1 ms each for the small tensors). That halves the over-prediction at 1536-2240 GPUs "
                  "(+168% -> +106%) but the measured step stays ~67 s from 768 to 1536 GPUs while the model's "
                  "falls: per-message bandwidth of the ~1 MB chunks (not priced: the model gives every message "
                  "the link's large-message bus bandwidth) is the suspected rest; not verified",
    "mcore_h100": "the smallest models of the series (1.7B and 7.1B: h 2048 and 4096, 131k vocabulary): micro-batch, "
                  "interleaving and recomputation unstated (default rule: micro-batch 1, none); their steps are "
                  "the shortest of the series (1.7B: ~0.45 s for 16k tokens per GPU), so per-step costs the model "
                  "does not price (data loading, logging, launch gaps of small kernels) weigh most; not verified",
    "mcore_fp32_reduce": "predicted slower than measured since the megatron cost profile prices what Megatron-Core "
                         "does with bf16: gradients reduce-scattered in fp32 (accumulate_allreduce_grads_in_fp32), "
                         "per 40M-element bucket at NCCL's per-step latency, over a dp group of one GPU per node "
                         "(one NIC), exposed beyond the last micro-batch's backward (micro-batch 1 by the default "
                         "rule). The measured throughput implies the reduction is hidden better than that rule "
                         "(or a larger unstated micro-batch, or --grad-reduce-in-bf16); not verified",
    "mcore_strong": "tp/pp/dp unstated: the split rule picks tp 8 and the fewest pipeline stages that fit (96 GPUs: "
                    "pp 3, almost no bubble; 4608 GPUs: pp 2 with 4 micro-batches, a 25% bubble); the runs' layouts "
                    "(interleaving?) are unknown",
    "foundry_norecompute": "llm-foundry's runs without activation checkpointing are slower per token than a "
                           "work-based model allows: on H100 the 13B model trains 4800 tokens/s/GPU without "
                           "checkpointing (micro-batch 2, 64 GPUs) and 5080 with it (micro-batch 16, 128 GPUs), "
                           "although checkpointing adds a third more FLOPs per token. The runs without it use "
                           "the small micro-batches that fit, so the missing cost is per micro-batch, and it is "
                           "neither FLOPs nor (by this model's estimate) exposed FSDP traffic; not identified",
    "foundry_fast": "llm-foundry's single-node A100 80 GB runs of the 13B model at 16k-32k-token sequences are faster "
                    "than the framework average that FRAMEWORK_EFFICIENCY encodes (the same model and sequence "
                    "lengths on H100 are within 5%)",
    "foundry_tight": "runs where model states fill most of the GPU (13B on eight 40 GB GPUs, 70B on 64 x 40 GB or "
                     "32 x 80 GB, 30B on eight 80 GB GPUs at 4k-8k tokens per sequence): they fit only small "
                     "micro-batches and lose per-token speed the model does not price: 13B at 2k tokens on A100 "
                     "40 GB trains 1668 tokens/s/GPU on 8 GPUs (micro-batch 4) and 1993 on 16 (micro-batch 10), "
                     "where the model predicts the same; allocator pressure is suspected, not verified",
    "titan_asynctp": "ratio of async to vanilla TP: the model hides all TP communication behind the GEMMs and "
                     "prices vanilla TP at ring all-gather/reduce-scatter speed on an H100 SXM; this 500 W part "
                     "computes slower (smaller communication share) and async TP hides only part of it",
}


def miss_reason(res: Result, row: dict) -> str:
    """The cause (key of REASONS) a row's error is attributed to; '' when within the 12% goal."""
    if res.metric == "reference" or abs(res.error) <= GOAL_STATED:
        return ""
    group = row["source_group"]
    if group.startswith("megatron_sc21"):
        return "sc21_zero3"
    if group == "megatron_lm_readme_h100":
        if row.get("tp") is None:
            return "mcore_strong"
        return "mcore_fp32_reduce" if res.error < 0 else "mcore_h100"
    if group.startswith("torchtitan"):
        return "titan_asynctp"
    if (row.get("recompute") or "").lower() == "none":
        return "foundry_norecompute"
    return "foundry_fast" if res.error < 0 else "foundry_tight"


def compared(results: list[Result]) -> list[Result]:
    return [r for r in results if r.metric != "reference"]


def summary(results: list[Result]) -> dict:
    cmp = compared(results)
    errs = [abs(r.error) for r in cmp]
    stated = [abs(r.error) for r in cmp if r.fully_stated]
    return {
        "rows": len(results), "compared": len(cmp), "median_abs_error": statistics.median(errs),
        "max_abs_error": max(errs), "fully_stated_rows": len(stated),
        "fully_stated_max_abs_error": max(stated) if stated else None,
        "rows_over_12pct": sum(e > GOAL_STATED for e in errs),
        "goal_median_met": statistics.median(errs) <= GOAL_MEDIAN,
        "goal_stated_met": all(e <= GOAL_STATED for e in stated),
    }


def memory_check(rows: list[dict], results: list[Result]) -> list[str]:
    """Rows whose source states a measured peak memory (torchtitan): predicted vs measured, for information.

    Not part of the statistics (the step-time error is). torchtitan's "selective" checkpointing is its op-level
    policy (it saves matmul outputs except every second one, the attention output and reduce-scatters, and
    recomputes the rest), priced as recompute "op" (``transformer.block_op_policy_activation_bytes``).
    """
    out = []
    for row, res in zip(rows, results):
        measured = (row.get("other_measured") or {}).get("peak_memory_GiB")
        if measured:
            out.append(f"{row['id']}: measured {measured:.1f} GiB, predicted {res.peak_memory_gib:.1f} GiB "
                       f"({100 * (res.peak_memory_gib / measured - 1):+.0f}%)")
    return out


def by_source(results: list[Result]) -> list[tuple[str, int, float, float]]:
    """(source group, rows compared, median error, max |error|) per source."""
    out = []
    for group in dict.fromkeys(r.group for r in results):
        errs = [r.error for r in compared(results) if r.group == group]
        if errs:
            out.append((group, len(errs), statistics.median(errs), max(abs(e) for e in errs)))
    return out


def _cells(r: Result) -> list[str]:
    err = "ref" if r.metric == "reference" else f"{100 * r.error:+.1f}"
    strat = r.strategy + (f" ({'; '.join(r.defaults)})" if r.defaults else "")
    return [r.id, r.metric, f"{r.measured:.4g}", f"{r.predicted:.4g}", err, "yes" if r.fully_stated else "",
            r.reason, strat]


def render(results: list[Result], markdown: bool, memory: list[str] | None = None) -> str:
    """The per-row table, the per-source summary, the reasons for misses and the overall statistics."""
    head = ["row", "metric", "measured", "predicted", "error %", "stated", "miss reason", "strategy (defaults)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if markdown else []
    for r in results:
        c = _cells(r)
        lines.append("| " + " | ".join(c) + " |" if markdown else
                     f"{c[0]:44s} {c[1]:22s} {c[2]:>8s} {c[3]:>8s} {c[4]:>7s} {c[5]:3s} {c[6]:20s} {c[7]}")
    lines += ["", "| source | rows | median error | max abs error |" if markdown else "per source:",
              "|---|---|---|---|" if markdown else ""]
    for group, n, med, worst in by_source(results):
        lines.append(f"| {group} | {n} | {100 * med:+.1f}% | {100 * worst:.1f}% |" if markdown else
                     f"  {group:32s} {n:4d} rows, median {100 * med:+6.1f}%, max |error| {100 * worst:6.1f}%")
    lines += ["", "Miss reasons (rows beyond 12%):"]
    for key, text in REASONS.items():
        n = sum(r.reason == key for r in results)
        if n:
            lines.append(f"- `{key}` ({n} rows): {text}" if markdown else f"  {key} ({n} rows): {text}")
    if memory:
        lines += ["", "Peak memory where a source states it (information only, see memory_check):"]
        lines += [f"- {m}" for m in memory]
    s = summary(results)
    stated = s["fully_stated_max_abs_error"] or 0.0
    lines += ["", f"rows {s['rows']}, compared {s['compared']}: median |error| {100 * s['median_abs_error']:.1f}%, "
              f"max |error| {100 * s['max_abs_error']:.1f}%; fully stated rows {s['fully_stated_rows']}: max |error| "
              f"{100 * stated:.1f}%; rows over 12%: {s['rows_over_12pct']}"]
    return "\n".join(lines)


def fit_framework_efficiency(rows: list[dict], iterations: int = 4) -> float:
    """The framework efficiency that makes the median measured / predicted ratio 1 over ``rows``.

    Fixed point ``eta <- eta x median(measured / predicted(eta))``; ratio rows (torchtitan) do not depend on it.
    """
    eta = 1.0
    for _ in range(iterations):
        res = [r for r in compared(evaluate(rows, eta)) if r.metric != "tokens/s ratio"]
        eta = min(1.0, eta * statistics.median(r.measured / r.predicted for r in res))
    return eta


def calibrate(rows: list[dict]) -> str:
    """Leave-one-source-out calibration of FRAMEWORK_EFFICIENCY: fit on all other sources, test on the held-out one."""
    lines = [f"framework efficiency fitted on all rows: {fit_framework_efficiency(rows):.3f}", "",
             "held-out source                  eta (fit on the others)  rows  median error  median |error|"]
    held_out: list[Result] = []
    for group in dict.fromkeys(r["source_group"] for r in rows):
        eta = fit_framework_efficiency([r for r in rows if r["source_group"] != group])
        res = compared(evaluate(rows, eta))
        mine = [r for r in res if r.group == group]
        held_out += mine
        lines.append(f"{group:32s} {eta:23.3f} {len(mine):5d} {100 * statistics.median(r.error for r in mine):+12.1f}%"
                     f" {100 * statistics.median(abs(r.error) for r in mine):14.1f}%")
    errs = [abs(r.error) for r in held_out]
    lines.append(f"\nout-of-sample (each source predicted with eta fitted on the others): median |error| "
                 f"{100 * statistics.median(errs):.1f}%, rows over 12%: {sum(e > GOAL_STATED for e in errs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="published_runs.jsonl")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", type=Path, default=None, help="also write per-row results as JSON")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the framework efficiency, leaving each source out in turn, and exit")
    parser.add_argument("--framework-efficiency", type=float, default=None,
                        help="override the cost model's FRAMEWORK_EFFICIENCY (1.0 = the uncalibrated kernel model)")
    parser.add_argument("--moe", action="store_true",
                        help="the Mixture-of-Experts table instead (data/moe_runs.jsonl, benchmarks/moe_fidelity.py)")
    parser.add_argument("--write", action="store_true",
                        help="with --moe: also write its report to benchmarks/results/moe_fidelity.md")
    args = parser.parse_args(argv)
    if args.moe:  # same conventions, its own module (this file's directory holds it)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import moe_fidelity

        return moe_fidelity.main((["--markdown"] if args.markdown else []) + (["--write"] if args.write else [])
                                 + ([] if args.data == DEFAULT_DATA else ["--data", str(args.data)]))
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.calibrate:
        print(calibrate(rows))
        return 0
    results = evaluate(rows, args.framework_efficiency)
    print(render(results, args.markdown, memory_check(rows, results)))
    if args.json:
        payload = {"summary": summary(results), "default_rule": DEFAULT_RULE,
                   "frameworks": {k: asdict(v) for k, v in FRAMEWORKS.items()},
                   "rows": [{**asdict(r), "error": r.error if r.metric != "reference" else None} for r in results]}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
