"""``paraplan estimate``: predict one fixed strategy with the planner's cost model (no search)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def estimate_summary(est, cluster, compute_source: str) -> dict:
    """The ``--json`` object: the issue's keys first, then the rest of the estimate; for a Mixture-of-Experts model
    also ``model_states_bytes``, its params + grads + optimizer split into dense and expert parts."""
    m = est.memory_breakdown_bytes
    experts = {} if m.expert_states == 0 else {"model_states_bytes": {
        "dense": m.dense_states, "expert": m.expert_states, "expert_params": m.expert_params,
        "expert_grads": m.expert_grads, "expert_optimizer": m.expert_optimizer}}
    return {
        "step_time_s": est.step_time_s,
        "model_tflops_per_device": est.model_tflops_per_device,
        "mfu": est.mfu,
        "hfu": est.hfu,
        "peak_memory_bytes": est.peak_memory_bytes,
        "memory_breakdown_bytes": {"params": m.params, "grads": m.grads, "optimizer": m.optimizer,
                                   "activations": m.activations, "other": m.other},
        **experts,
        "hardware_tflops_per_device": est.hardware_tflops_per_device,
        "tokens_per_s": est.tokens_per_s,
        "memory_capacity_bytes": est.memory_capacity_bytes,
        "fits": est.fits,
        "most_loaded_stage": est.most_loaded_stage,
        "stage_blocks": est.stage_blocks,
        "grad_accum": est.grad_accum,
        "pipeline_s": est.pipeline_s,
        "bubble_s": est.bubble_s,
        "dp_comm_s": est.dp_comm_s,
        "optimizer_s": est.optimizer_s,
        "host_bytes": est.host_bytes,
        "nvme_bytes": est.nvme_bytes,
        "binding": est.binding,
        "peak_flops_per_s": cluster.device.peak_flops_per_s,
        "flop_count": est.flop_count,
        "compute_source": compute_source,
    }


def _render(console, spec, cluster, train, st, est, compute_source: str) -> None:
    from rich.table import Table

    from paraplan.cli.render import format_memory_breakdown
    from paraplan.units import format_bytes, format_seconds

    sched = "" if st.pp == 1 else f" {st.schedule}" if st.schedule != "1f1b" or st.vpp == 1 else " interleaved_1f1b"
    experts = (f" ep={st.ep}" + (f" etp={st.etp}" if st.etp > 1 else "")) if spec.moe is not None else ""
    title = (f"{spec.name} on {cluster.name}: dp={st.dp} tp={st.tp} pp={st.pp}" + (f" cp={st.cp}" if st.cp > 1 else "")
             + experts
             + sched + (f" vpp={st.vpp}" if st.vpp > 1 else "") + f", micro-batch {st.micro_batch_size} (x "
             f"{est.grad_accum} per step), global batch {train.global_batch} x seq {train.seq_len}, {train.dtype}, "
             f"ZeRO-{st.zero_stage}, recompute {st.recompute}" + (", SP" if st.sequence_parallel else "")
             + f" (compute from {compute_source}"
             + (f"; {st.backend} cost profile" if st.backend else "") + ")")
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("predicted", justify="right")
    rows = [
        ("step time", format_seconds(est.step_time_s)),
        ("  pipeline (incl. bubble)", format_seconds(est.pipeline_s)),
        ("  bubble", format_seconds(est.bubble_s)),
        ("  exposed DP/ZeRO communication", format_seconds(est.dp_comm_s)),
        ("  optimizer step", format_seconds(est.optimizer_s)),
        ("tokens/s", f"{est.tokens_per_s:,.0f}"),
        ("model TFLOP/s per device", f"{est.model_tflops_per_device:.4g}"),
        ("MFU", f"{est.mfu:.1%}"),
        ("hardware TFLOP/s per device", f"{est.hardware_tflops_per_device:.4g}"),
        ("HFU", f"{est.hfu:.1%}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    fit = "fits" if est.fits else "DOES NOT FIT"
    console.print(
        f"peak memory per device (stage {est.most_loaded_stage}): {format_bytes(est.peak_memory_bytes)} of "
        f"{format_bytes(est.memory_capacity_bytes)} ({fit}): {format_memory_breakdown(est.memory_breakdown_bytes)}",
        highlight=False)
    if est.host_bytes or est.nvme_bytes:
        console.print(f"offloaded per device: host memory {format_bytes(est.host_bytes)}, NVMe "
                      f"{format_bytes(est.nvme_bytes)}", highlight=False)
    console.print(f"binding: {est.binding}", highlight=False)
    console.print(f"FLOP count: {est.flop_count}", highlight=False, soft_wrap=True)


def register(app: typer.Typer, guard) -> None:
    """Add ``estimate`` to the typer app (called by paraplan.cli.app)."""

    @app.command("estimate")
    @guard
    def estimate_cmd(
        model: Annotated[str, typer.Argument(help="Preset, model file (.yaml/.json: family, n_layers, hidden, "
                                                  "ffn_hidden, n_heads, n_kv_heads, vocab, tied_embeddings), or a "
                                                  "Hugging Face config.json (or its folder).")],
        cluster: Annotated[str, typer.Option(help="cpu:N, 8xH100-80GB, 4x8xA100-80GB or a cluster file.")],
        global_batch: Annotated[int, typer.Option(help="Sequences per optimizer step.", min=1)],
        seq_len: Annotated[int, typer.Option(help="Tokens per sequence.", min=1)],
        tp: Annotated[Optional[int], typer.Option(help="Tensor-parallel degree.", min=1)] = None,
        pp: Annotated[Optional[int], typer.Option(help="Pipeline-parallel degree.", min=1)] = None,
        dp: Annotated[Optional[int], typer.Option(help="Data-parallel degree (dp x tp x pp x cp = devices).",
                                                  min=1)] = None,
        micro_batch: Annotated[Optional[int], typer.Option(help="Sequences per micro-batch.", min=1)] = None,
        cp: Annotated[int, typer.Option(help="Context-parallel degree (sequence sharded over cp ranks).", min=1)] = 1,
        vpp: Annotated[int, typer.Option(help="Model chunks (virtual stages) per pipeline rank.", min=1)] = 1,
        ep: Annotated[int, typer.Option(help="Expert-parallel degree (MoE models; divides the experts).", min=1)] = 1,
        etp: Annotated[int, typer.Option(help="Expert tensor-parallel degree (MoE models).", min=1)] = 1,
        routing_imbalance: Annotated[float, typer.Option(
            help="MoE: tokens the busiest expert rank receives over the balanced mean (an assumption; 1 = balanced).",
            min=1.0)] = 1.0,
        capacity_factor: Annotated[Optional[float], typer.Option(
            help="MoE: expert capacity factor (tokens beyond it are dropped); default dropless.", min=0.0)] = None,
        dispatcher: Annotated[str, typer.Option(
            help="MoE token dispatch: alltoall (NCCL all-to-all; the torch backend) or deepep (node-aware "
                 "forwarding, DeepSeek-V3 sec. 3.2.2).")] = "alltoall",
        schedule: Annotated[str, typer.Option(
            help="Pipeline schedule: 1f1b (interleaved when --vpp > 1), interleaved_1f1b, zero_bubble, zbv (--vpp 2) "
                 "or gpipe.")] = "1f1b",
        sequence_parallel: Annotated[bool, typer.Option("--sequence-parallel",
                                                        help="Megatron sequence parallelism.")] = False,
        recompute: Annotated[str, typer.Option(
            help="none, selective (attention core), op (torchtitan's op-level selective policy) or full.")] = "none",
        strategy: Annotated[Optional[str], typer.Option(
            help="The strategy as plan's --strategy text (dp=8,tp=8,pp=16,cp=16,vpp=2,mb=1,sp=true,zero=1,"
                 "recompute=full,schedule=interleaved_1f1b); its keys replace the options above.")] = None,
        zero: Annotated[int, typer.Option(help="ZeRO stage 0-3 over the data-parallel group.")] = 0,
        offload_optimizer: Annotated[bool, typer.Option(
            "--offload-optimizer", help="Optimizer states in host memory (--strategy offload=nvme,offload_param=nvme,"
                                        "offload_act=true for the other tiers).")] = False,
        attention: Annotated[str, typer.Option(
            help="flash3 (Hopper-native: FlashAttention-3, cuDNN/TransformerEngine), flash2, flash1 or unfused.")
        ] = "flash2",
        tp_comm_overlap: Annotated[bool, typer.Option("--tp-comm-overlap",
                                                      help="TP collectives overlap the GEMMs.")] = False,
        dp_overlap: Annotated[Optional[bool], typer.Option(
            "--dp-overlap/--no-dp-overlap",
            help="DP/ZeRO communication overlaps compute (default: yes on GPUs, no on CPU/gloo).")] = None,
        dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on GPU), bf16, fp16 or fp32.")] = "auto",
        stage_blocks: Annotated[Optional[str], typer.Option(
            help="Blocks per pipeline stage (rank), comma-separated, e.g. 7,8,...,8,7 for Llama 3 405B's 126 blocks "
                 "on pp 16 (default: as even as possible, earlier stages take the remainder).")] = None,
        profile: Annotated[Optional[Path], typer.Option(help="Profile from `paraplan profile`.")] = None,
        device_memory: Annotated[Optional[str], typer.Option(
            help="Memory per device, e.g. 1.5GiB, replacing the cluster's (a budget).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
        backend: Annotated[Optional[str], typer.Option(
            help="Price with a backend's conventions (paraplan/cost_models/backend_profiles.py): deepspeed, torch, "
                 "megatron, or any (the costlier of deepspeed and torch); default: the generic model.")] = None,
        elementwise: Annotated[str, typer.Option(
            help="Element-wise kernels: fused (TransformerEngine/apex kernels or torch.compile) or eager (PyTorch "
                 "eager mode's kernel sequence for Llama blocks).")] = "fused",
        calibration: Annotated[Optional[Path], typer.Option(
            help="Calibration file from `paraplan calibrate` (same cluster, --backend and dtype; needs --profile): "
                 "prices with its fitted coefficients.")] = None,
    ) -> None:
        """Predict step time, TFLOP/s, MFU/HFU and peak memory per device of one fixed strategy."""
        from paraplan.catalog import load_cluster_spec
        from paraplan.cli import app as cli
        from paraplan.cost_models.estimate import StrategySpec, estimate_strategy
        from paraplan.errors import StrategyError
        from paraplan.models.presets import load_model_spec
        from paraplan.types import TrainSpec

        spec = load_model_spec(model)
        clus = load_cluster_spec(cluster, device_memory)
        dtype = cli.resolve_dtype(dtype, clus)
        train = TrainSpec(global_batch=global_batch, seq_len=seq_len, dtype=dtype)  # type: ignore[arg-type]
        prof = cli.load_profile(profile)
        try:
            blocks = tuple(int(x) for x in stage_blocks.split(",")) if stage_blocks else None
        except ValueError:
            raise StrategyError(f"--stage-blocks {stage_blocks}: write comma-separated integers, one per stage") \
                from None
        knobs = {"dp": dp, "tp": tp, "pp": pp, "micro_batch_size": micro_batch, "cp": cp, "vpp": vpp,
                 "schedule": schedule, "sequence_parallel": sequence_parallel, "recompute": recompute,
                 "zero_stage": zero, "offload_optimizer": offload_optimizer, "ep": ep, "etp": etp,
                 "routing_imbalance": routing_imbalance, "capacity_factor": capacity_factor, "dispatcher": dispatcher}
        if strategy:
            knobs.update(cli.parse_strategy(strategy).model_dump(exclude_none=True))
        missing = [k for k in ("dp", "tp", "pp", "micro_batch_size") if knobs[k] is None]
        if missing:
            flags = {"micro_batch_size": "--micro-batch (or mb= in --strategy)"}
            raise StrategyError("estimate needs every degree and the micro-batch: give "
                                + ", ".join(flags.get(k, f"--{k} (or {k}= in --strategy)") for k in missing))
        if backend is not None and backend not in ("deepspeed", "torch", "megatron", "any"):
            raise StrategyError(f"--backend {backend}: use deepspeed, torch, megatron or any (or leave it out for the "
                                "generic model)")
        st = StrategySpec(stage_blocks=blocks, attention=attention, overlap_dp=dp_overlap,  # type: ignore[arg-type]
                          overlap_tp=tp_comm_overlap, backend=backend, elementwise=elementwise, **knobs)
        if calibration is not None:  # priced on the calibrated inputs (paraplan.cost_models.calibration)
            from paraplan.cost_models.calibration import (
                apply_calibration, calibrated_estimate, check_calibration, coverage_warning, read_calibration,
            )

            cal = read_calibration(calibration)
            check_calibration(cal, clus, backend, dtype)
            cal_clus, cal_prof = apply_calibration(cal, clus, prof)
            est = calibrated_estimate(cal, estimate_strategy(spec, cal_clus, train, st, cal_prof),
                                      clus.device.memory_bytes)
            note = coverage_warning(cal, st)
            if note:
                cli.err_console.print(f"[yellow]note:[/] {note}")
        else:
            est = estimate_strategy(spec, clus, train, st, prof)
        source = "profile" if prof is not None else "analytic"
        if as_json:
            cli.print_json({**estimate_summary(est, clus, source), "backend": backend})
            return
        _render(cli.console, spec, clus, train, st, est, source)
