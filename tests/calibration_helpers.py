"""Synthetic calibration runs: measurements generated from known coefficients (tests of
``paraplan.cost_models.calibration`` and of ``paraplan calibrate``)."""

from __future__ import annotations

from pathlib import Path

from conftest import make_plan

from paraplan.cost_models.calibration import RunData, plan_costs_at, transform_inputs
from paraplan.cost_models.costs import predict
from paraplan.models.presets import load_model_spec
from paraplan.types import LayerProfile, LinkProfile, ModelProfile

MiB = 2 ** 20
SEQ = 64
# Times per micro-batch of 2 sequences (s); param counts do not matter (the cost model counts the preset's).
TIMES = {"embed": (1e-4, 2e-4), "block": (4e-3, 9e-3), "head": (2e-3, 5e-3)}


def hand_profile() -> ModelProfile:
    layers = [LayerProfile(kind=k, micro_batch_size=2, fwd_time_s=f, bwd_time_s=b, param_count=0, param_bytes=0,
                           activation_bytes=0, output_bytes=1, fwd_flops=0.0, bwd_flops=0.0)
              for k, (f, b) in TIMES.items()]
    # gloo figures as the profiler stores them: 16 MiB at 1 GB/s bus bandwidth, 64 KiB in 250 us.
    links = [LinkProfile(name="allreduce_gloo_2proc", bytes=16 * MiB, time_s=16 * MiB / 1e9, bandwidth_bytes_per_s=1e9),
             LinkProfile(name="allreduce_gloo_2proc_small", bytes=65536, time_s=250e-6,
                         bandwidth_bytes_per_s=65536 / 250e-6),
             LinkProfile(name="host_memcpy", bytes=2**27, time_s=0.02, bandwidth_bytes_per_s=2**27 / 0.02)]
    return ModelProfile(model=load_model_spec("llama-tiny"), device_name="hand", device_kind="cpu", dtype="fp32",
                        seq_len=SEQ, warmup=0, repeats=1, layers=layers, links=links)


TRUE = {"compute_scale_fwd": 1.6, "compute_scale_bwd": 1.3, "link_time_scale": 2.0, "latency_s": 4e-4,
        "optimizer_scale": 1.5, "step_overhead_s": 0.05}
# Overheads seen only by runs with tp > 1 / ZeRO-3 (of the order measured on cpu:2: benchmarks/results/calibration.md).
TRUE_OVERHEADS = {"tp_overhead_s": 0.02, "zero3_fetch_overhead_s": 0.004}
MEM_SCALE, MEM_OFFSET = 1.1, 50 * MiB


def synthetic_run(tmp: Path, global_batch: int = 8, **plan_kw) -> RunData:
    """A run whose measurements follow the cost model at the TRUE coefficients and TRUE_OVERHEADS: step times, and
    phases built by hand from the profile's layer times (forward of stage 0, backward of the last stage, optimizer,
    and the collectives of a run without pipelining or tensor parallelism: the gloo time, without the overheads)."""
    return synthetic_run_of(tmp, make_plan(cluster="cpu:2", seq_len=SEQ, global_batch=global_batch,
                                           micro_batch_size=2, **plan_kw))


def synthetic_run_of(tmp: Path, plan) -> RunData:
    """:func:`synthetic_run` of a given plan (cpu:2, llama-tiny, micro-batch 2, sequence length SEQ)."""
    prof = hand_profile()
    uncal = predict(*plan_costs_at(plan, *transform_inputs(plan.cluster, prof, 1, 1, 1, 250e-6 - 65536 / 1e9, 1),
                                   "torch"))
    plan = plan.model_copy(update={"predicted": uncal, "profile_path": plan.profile_path})
    t = TRUE
    args = (t["compute_scale_fwd"], t["compute_scale_bwd"], t["link_time_scale"], t["latency_s"], t["optimizer_scale"])
    truth = predict(*plan_costs_at(plan, *transform_inputs(plan.cluster, prof, *args, *TRUE_OVERHEADS.values()),
                                   "torch"))
    wire = predict(*plan_costs_at(plan, *transform_inputs(plan.cluster, prof, *args), "torch"))  # no overheads
    s, n = plan.strategy, load_model_spec("llama-tiny").n_layers
    world, m = s.dp * s.pp, s.grad_accum
    blocks = [st.n_blocks for st in s.stages]
    fwd0 = m * (TIMES["embed"][0] + blocks[0] * TIMES["block"][0] + (TIMES["head"][0] if s.pp == 1 else 0))
    bwd_last = m * (TIMES["head"][1] + blocks[-1] * TIMES["block"][1] + (TIMES["embed"][1] if s.pp == 1 else 0))
    step = truth.step_time_s + t["step_overhead_s"]
    phases = {"forward_s": [t["compute_scale_fwd"] * fwd0] * world,
              "backward_s": [t["compute_scale_bwd"] * bwd_last] * world,
              "optimizer_s": [truth.optimizer_s] * world, "comm_s": {}, "comm_count": {}, "step_s": [step] * world}
    if s.pp == 1 and s.tp == 1:  # the gradients' (ZeRO-3: and parameters') collectives: latency + bytes / bus bw
        comm = wire.dp_comm_s
        phases["comm_s"] = {"all_reduce": [comm, comm + 0.01]}
        phases["comm_count"] = {"all_reduce": [1, 1]}
    peak = MEM_SCALE * uncal.peak_memory_bytes + MEM_OFFSET
    rows = [{"step": k, "step_time_s": step, "peak_memory_bytes": [peak, peak - MiB], "loss": 1.0,
             **({"phases": phases} if k == 1 else {})} for k in range(6)]
    assert n == sum(blocks)
    return RunData(tmp, plan, "torch", prof, rows)
