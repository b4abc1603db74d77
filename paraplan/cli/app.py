"""The ``paraplan`` command line: models, profile, plan, estimate, launch. Thin commands over the library.

Every user error (ParaplanError, pydantic ValidationError, a bad option value or usage) prints a short message on
stderr and exits 1; other exceptions keep their traceback. ``--json`` output is the only thing on stdout: solver
logs, progress and warnings go to stderr.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from typer.core import TyperGroup

from paraplan import __version__
from paraplan.errors import LaunchError, ParaplanError, ProfileError, StrategyError, format_validation_error
from paraplan.files import check_output_path, read_model, write_atomic
from paraplan.types import Plan, StrategyOverride, TrainSpec


# typer >= 0.25 ships its own copy of click; its UsageError is the base of the public typer.BadParameter.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Group(TyperGroup):
    """Click's usage errors (unknown option, bad value, missing argument) exit 1 like every other user error.

    Click and typer exit 2 on usage errors; paraplan's contract is one code for "change your input" (1), so a
    script or scheduler tells user errors (1) from crashes and signals.
    """

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as exc:
            exc.exit_code = 1
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            exc.exit_code = 1
            raise


app = typer.Typer(cls=_Group, no_args_is_help=True, help=__doc__.splitlines()[0])
# Piped output (CI logs, tests) gets a wide table instead of rich's 80-column default.
_WIDTH = shutil.get_terminal_size((160, 24)).columns
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)


def _version(value: bool) -> None:
    if value:
        print(f"paraplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """paraplan: plan and launch parallel PyTorch training (profile, plan, estimate, launch)."""


def _error(message: str) -> None:
    """Print ``error: message`` on stderr; the message is plain text (brackets in it are not rich markup)."""
    from rich.text import Text

    err_console.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)


def _fail(message: str) -> None:
    _error(message)
    raise typer.Exit(1)


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _guard(func):
    """Render user errors as a message + exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ParaplanError as exc:
            _error(str(exc))
            raise typer.Exit(getattr(exc, "exit_code", 1)) from None
        except ValidationError as exc:
            _fail(format_validation_error("input", exc))
        except OSError as exc:
            if exc.errno not in _OUTPUT_ERRNOS:
                raise
            _fail(f"cannot write output: {exc.strerror} ({exc.filename or 'stdout'})")

    return wrapper


def print_json(obj: object) -> None:
    """Write ``obj`` as JSON on stdout (the only thing a ``--json`` command writes there)."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


_STRATEGY_KEYS = StrategyOverride.CLI_KEYS
STRATEGY_HELP = (
    "Force parts of the strategy, comma-separated key=value: dp, tp, pp, cp (context parallelism), vpp (model chunks "
    "per pipeline rank) (positive integers), mb or micro_batch (sequences per micro-batch), zero (ZeRO stage 0-3), "
    "offload (optimizer states, fp32 master weights and gradients: none, cpu or nvme; true = cpu), offload_param "
    "(ZeRO-3 parameters: none, cpu or nvme), offload_ratio (share of the optimizer offloaded, ZeRO-3 cpu), "
    "offload_act (false forbids paging activations), recompute (none; selective = the attention core of "
    "every block; op = torchtitan's op-level selective policy on every block; full = every block), sp (Megatron "
    "sequence parallelism with tp > 1: true/false), schedule (1f1b, interleaved_1f1b, zero_bubble, zbv), ep and etp "
    "(expert-parallel and expert tensor-parallel degrees of a Mixture-of-Experts model). "
    "Example: dp=2,tp=2,pp=2,mb=2,zero=1,sp=true,schedule=interleaved_1f1b,vpp=2"
)


def parse_strategy(text: str | None) -> StrategyOverride:
    """``dp=2,tp=2,pp=2,mb=4,zero=3,offload=true,recompute=full,sp=true`` -> StrategyOverride.

    The values are validated by :class:`StrategyOverride`: positive integers for dp, tp, pp and mb, 0-3 for zero,
    a boolean (true/false, yes/no, on/off, 1/0) for offload and sp, none, selective, op or full for recompute,
    1f1b, interleaved_1f1b, zero_bubble or zbv for schedule.

    Raises:
        StrategyError: an unknown or repeated key, a part without ``=``, or a value its field does not accept.
    """
    if not text:
        return StrategyOverride()
    fields: dict[str, str] = {}
    written: dict[str, str] = {}  # field -> the key=value the user wrote, for the error message
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip()
        if not sep or key not in _STRATEGY_KEYS:
            raise StrategyError(f"--strategy '{part}': write key=value with keys {', '.join(_STRATEGY_KEYS)}")
        field = _STRATEGY_KEYS[key]
        if field in fields:
            raise StrategyError(f"--strategy gives {field} twice ('{written[field]}' and '{part.strip()}'); "
                                "give each key once")
        fields[field] = value.strip()
        written[field] = part.strip()
    try:
        return StrategyOverride(**fields)
    except ValidationError as exc:
        lines = ["--strategy is invalid:"]
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "(root)"
            lines.append(f"  - {written.get(field, field)}: {err['msg']}")
        raise StrategyError("\n".join(lines)) from exc


@app.command("models")
@_guard
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the presets as JSON (ModelSpec fields and params).")
                       ] = False,
) -> None:
    """List model presets with their parameter counts (Mixture-of-Experts ones: also active per token)."""
    from paraplan.cost_models.transformer import model_params
    from paraplan.models.moe import count_params
    from paraplan.models.presets import PRESETS
    from paraplan.units import format_count

    def active(s) -> int:
        return count_params(s).active if s.moe is not None else model_params(s)

    if as_json:
        print_json([{**s.model_dump(exclude_none=True), "params": model_params(s), "active_params": active(s),
                     "planning_supported": s.moe is None or s.moe.layer_freq == 1} for s in PRESETS.values()])
        return
    from rich.table import Table

    table = Table(title="model presets")
    for col in ("name", "family", "params", "layers", "hidden", "ffn", "heads", "kv heads", "vocab", "notes"):
        table.add_column(col, justify="left" if col in ("name", "family", "notes") else "right")
    for name, s in PRESETS.items():
        notes = "" if s.moe is None else (f"MoE: {s.moe.n_experts} experts, top-{s.moe.top_k}, "
                                          f"{format_count(active(s))} active")
        table.add_row(name, s.family, format_count(model_params(s)), str(s.n_layers), str(s.hidden),
                      str(s.ffn_hidden), str(s.n_heads), str(s.n_kv_heads), str(s.vocab), notes)
    console.print(table)


@app.command("profile")
@_guard
def profile_cmd(
    model: Annotated[str, typer.Argument(help="Preset, model/config file (or a folder with config.json), or "
                                              "package.module:factory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the profile JSON.")] = Path(
        "profile.json"),
    micro_batches: Annotated[str, typer.Option(help="Comma-separated micro-batch sizes.")] = "1,2,4",
    seq_len: Annotated[int, typer.Option(help="Sequence length (tokens).", min=1)] = 128,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    warmup: Annotated[int, typer.Option(help="Untimed runs per measurement.", min=0)] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (median reported).", min=1)] = 5,
    links: Annotated[bool, typer.Option(help="Also measure copy and collective bandwidth.")] = True,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU only: torch threads while profiling. Use what each training process gets: cores / processes "
             "(`launch` runs cpu:N with that many).", min=1)] = None,
    overheads: Annotated[Optional[bool], typer.Option(
        "--overheads/--no-overheads",
        help="Also time what tp and ZeRO-3 cost each backend beyond their compute and collectives, in two "
             "processes (DTensor, FSDP2, DeepSpeed ZeRO-3 and AutoTP; tens of seconds to minutes). Default: on for "
             "a CPU profile of a dense llama model with --links.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (per-layer times, bytes, FLOPs) "
                                                         "instead of the table.")] = False,
) -> None:
    """Measure per-layer forward/backward time, parameter and activation memory and FLOPs on this device."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from paraplan.models.presets import load_model_spec

    spec = load_model_spec(model)
    check_output_path(output, "-o")
    if overheads:  # refused before anything is profiled
        from paraplan.backends.overheads import unsupported_model

        if not links:
            raise ProfileError("--overheads prices the timed passes against the measured links: drop --no-links "
                               "(or pass --no-overheads)")
        reason = unsupported_model(spec)
        if reason:
            raise ProfileError(f"{reason}: drop --overheads")
    try:
        sizes = [int(x) for x in micro_batches.split(",") if x.strip()]
    except ValueError:
        raise ProfileError(f"--micro-batches {micro_batches}: write comma-separated integers, e.g. 1,2,4") from None
    from paraplan.profiler import profile_model

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    # transient: the bar goes when profiling ends, so input the profiler refuses leaves only the error message.
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("profiling", total=None)

        def progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        prof = profile_model(spec, sizes, seq_len, dtype=dtype, warmup=warmup, repeats=repeats,
                             progress=progress, links=links)
        if overheads or (overheads is None and _overheads_apply(prof)):
            from paraplan.backends.overheads import profile_backend_overheads

            bar.update(task, description="timing tp and ZeRO-3 overheads (2 processes)", completed=0, total=None)
            prof = prof.model_copy(update={"backend_overheads": profile_backend_overheads(
                prof, warmup=warmup, repeats=repeats)})
    write_atomic(output, prof.model_dump_json(indent=2), "-o")
    if as_json:
        print_json({"model": prof.model.name, "device_name": prof.device_name, "device_kind": prof.device_kind,
                    "dtype": prof.dtype, "seq_len": prof.seq_len, "output": str(output),
                    "layers": [lp.model_dump() for lp in prof.layers], "links": [lk.model_dump() for lk in prof.links],
                    "backend_overheads": {k: v.model_dump() for k, v in prof.backend_overheads.items()}})
        return
    _print_profile(prof)
    console.print(f"wrote {output}")


def _print_profile(prof) -> None:
    from rich.table import Table

    from paraplan.units import format_bytes, format_seconds

    table = Table(title=f"{prof.model.name} on {prof.device_name} ({prof.dtype}, seq {prof.seq_len})")
    for col in ("layer", "micro-batch", "fwd", "bwd", "params", "activations", "fwd GFLOP"):
        table.add_column(col, justify="right")
    for lp in prof.layers:
        table.add_row(lp.kind, str(lp.micro_batch_size), format_seconds(lp.fwd_time_s),
                      format_seconds(lp.bwd_time_s), format_bytes(lp.param_bytes), format_bytes(lp.activation_bytes),
                      f"{lp.fwd_flops / 1e9:.2f}")
    console.print(table)
    for backend, over in prof.backend_overheads.items():
        parts = [f"{what} +{format_seconds(v / over.blocks)}" for what, v in (("tp=2", over.tp_extra_s),
                                                                             ("ZeRO-3", over.zero3_extra_s))
                 if v is not None]
        console.print(f"{backend}, per block and micro-batch {over.micro_batch_size} over plain blocks (2 processes): "
                      f"{', '.join(parts)}")


def _overheads_apply(prof) -> bool:
    """Whether `paraplan profile` times backend overheads by default: a CPU profile with links of a model
    paraplan.backends.overheads can time."""
    from paraplan.backends.overheads import unsupported_model

    return prof.device_kind == "cpu" and bool(prof.links) and unsupported_model(prof.model) is None


def load_profile(path: Path | None):
    """The ModelProfile in ``path`` (None for None). Whether it suits the model, sequence length, dtype and
    device kind is checked by the library (``ModelProfile.check_matches``) when it is used."""
    from paraplan.types import ModelProfile

    if path is None:
        return None
    return read_model(path, ModelProfile, "--profile", ProfileError, "run `paraplan profile` first")


def resolve_dtype(dtype: str, cluster) -> str:
    """``--dtype auto``: fp32 on a CPU cluster, bf16 on GPUs; any other value is passed on (TrainSpec checks it)."""
    if dtype == "auto":
        return "fp32" if cluster.device.kind == "cpu" else "bf16"
    return dtype


def _warn_thread_mismatch(prof, clus) -> None:
    """A CPU profile taken with more threads than each training process will get under-predicts step time."""
    if prof is None or prof.device_kind != "cpu" or clus.device.kind != "cpu" or prof.cpu_threads is None:
        return
    from paraplan.backends.launch import cpu_threads_per_process  # imports torch: only when a CPU profile is used
    want = cpu_threads_per_process(clus.devices_per_node)
    if prof.cpu_threads != want:
        err_console.print(f"[yellow]warning:[/] the profile used {prof.cpu_threads} threads; each of the "
                          f"{clus.devices_per_node} processes of {clus.name} gets {want}. Re-profile with "
                          f"--threads {want} for accurate times.", highlight=False)


@app.command("plan")
@_guard
def plan_cmd(
    model: Annotated[str, typer.Argument(help="Preset, model/config file (or a folder with config.json), or "
                                              "package.module:factory.")],
    cluster: Annotated[str, typer.Option(help="cpu:N, 8xH100-80GB, 4x8xA100-80GB or a cluster file.")],
    global_batch: Annotated[int, typer.Option(help="Sequences per optimizer step.", min=1)],
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.", min=1)],
    profile: Annotated[Optional[Path], typer.Option(help="Profile from `paraplan profile`.")] = None,
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on GPU), bf16, fp16 or fp32.")] = "auto",
    strategy: Annotated[Optional[str], typer.Option(help=STRATEGY_HELP)] = None,
    backend: Annotated[str, typer.Option(help="Backend(s) the plan must run on: any (both), deepspeed, torch, or "
                                              "unconstrained (cost only, e.g. GPT with tp); also the cost profile "
                                              "that prices it (any: the costlier of deepspeed and torch; "
                                              "unconstrained: Megatron-LM's).")] = "any",
    top: Annotated[int, typer.Option("--top", help="Plans to show (--json prints the best only, so it searches "
                                                   "for that one alone).", min=1)] = 5,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    time_limit: Annotated[float, typer.Option(help="MILP time limit per candidate (s, > 0).")] = 10.0,
    memory_fraction: Annotated[float, typer.Option(
        help="Share of device memory a plan may fill (headroom for fragmentation).", min=0.1, max=1.0)] = 0.95,
    device_memory: Annotated[Optional[str], typer.Option(
        help="Memory per device, e.g. 1.5GiB: a budget that replaces the cluster's (on cpu:N, this machine's memory "
             "split between the processes), so a plan must offload to fit.")] = None,
    routing_imbalance: Annotated[float, typer.Option(
        help="MoE: tokens the busiest expert rank receives over the balanced mean (an assumption; 1 = balanced).",
        min=1.0)] = 1.0,
    capacity_factor: Annotated[Optional[float], typer.Option(
        help="MoE: expert capacity factor (tokens beyond it are dropped); default dropless.", min=0.0)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead of the table.")] = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the best plan.")] = Path("plan.json"),
    explain: Annotated[bool, typer.Option("--explain", help="Say why this plan: its bottleneck, binding memory, and "
                                                            "what the next --top plans would change and cost.")
                       ] = False,
    compare: Annotated[Optional[list[str]], typer.Option(
        "--compare", help="With --explain (implied): a strategy to compare with the plan, in --strategy syntax "
                          "(repeatable), e.g. \"dp=8,tp=1,zero=3\"; keys not named keep the plan's values, dp fills "
                          "the devices when not named.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        help="Calibration file from `paraplan calibrate` (same cluster, --backend and dtype; needs --profile): "
             "prices with its fitted coefficients.")] = None,
) -> None:
    """Search dp x tp x pp x cp x micro-batch, sp, schedule and vpp, stage assignment, ZeRO, recomputation and
    offload for the fastest plan."""
    from paraplan.catalog import load_cluster_spec
    from paraplan.models.presets import load_model_spec
    from paraplan.planner.search import search_plans

    if backend not in ("any", "deepspeed", "torch", "unconstrained"):
        raise StrategyError(f"--backend {backend}: use any, deepspeed, torch or unconstrained")
    override = parse_strategy(strategy)
    check_output_path(output, "-o")
    spec = load_model_spec(model)
    clus = load_cluster_spec(cluster, device_memory)
    dtype = resolve_dtype(dtype, clus)
    train = TrainSpec(global_batch=global_batch, seq_len=seq_len, dtype=dtype, lr=lr)  # type: ignore[arg-type]
    prof = load_profile(profile)
    cal = None
    if calibration is not None:  # priced on the calibrated inputs (paraplan.cost_models.calibration)
        from paraplan.cost_models.calibration import apply_calibration, check_calibration, read_calibration

        cal = read_calibration(calibration)
        check_calibration(cal, clus, backend, dtype)
        capacity = clus.device.memory_bytes
        clus, prof = apply_calibration(cal, clus, prof)
    explain = explain or bool(compare)
    from paraplan.cli.progress import SearchDisplay

    with SearchDisplay(err_console, quiet=as_json) as on_progress:
        plans = search_plans(spec, clus, train, prof, override, top_k=1 if as_json and not explain else top,
                             backend=backend,
                             time_limit_s=time_limit, profile_path=str(profile) if profile else None,
                             memory_fraction=memory_fraction, progress=on_progress,
                             routing_imbalance=routing_imbalance, capacity_factor=capacity_factor)
    if cal is not None:
        from paraplan.cost_models.calibration import calibrated_plan, coverage_warning

        plans = [calibrated_plan(cal, p, capacity) for p in plans]
        note = coverage_warning(cal, plans[0])
        if note:
            err_console.print(f"[yellow]note:[/] {note}")
    _warn_thread_mismatch(prof, clus)
    why = None
    if explain:  # a bad --compare fails before the plan is written
        from paraplan.cli.explain import explain_plans, render_explanation

        why = explain_plans(plans, compare, prof, memory_fraction, backend)
    write_atomic(output, plans[0].model_dump_json(indent=2), "-o")
    if as_json:
        print_json(plan_summary(plans[0]) | ({"explain": why.to_json()} if why is not None else {}))
        return
    from paraplan.cli.render import render_plans

    render_plans(console, plans)
    if why is not None:
        render_explanation(console, why)
    console.print(f"wrote {output}")


def plan_summary(plan: Plan) -> dict:
    """The ``--json`` summary: ``strategy.*`` and ``predicted.*`` plus the solver's status."""
    s = plan.strategy
    return {
        "model": plan.model.name, "cluster": plan.cluster.name,
        "strategy": {
            "dp": s.dp, "tp": s.tp, "pp": s.pp, "micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum,
            "zero_stage": s.zero_stage, "offload_optimizer": s.offload_optimizer, "offload_param": s.offload_param,
            "offload_ratio": s.offload_ratio, "activation_tier": s.activation_tier,
            "offload_blocks": [st.offload_blocks for st in s.stages],
            "sequence_parallel": s.sequence_parallel, "selective_recompute": s.selective_recompute,
            "selective_policy": s.selective_policy, "cp": s.cp, "vpp": s.vpp, "schedule": s.schedule,
            "ep": s.ep, "etp": s.etp, "expert_data_parallel": s.edp,
            "recompute_blocks": [st.recompute_blocks for st in s.stages],
            "selective_blocks": [st.selective_blocks for st in s.stages],
            "stage_blocks": [st.n_blocks for st in s.stages],
            "chunk_blocks": [st.chunk_blocks for st in s.stages] if s.vpp > 1 else None,
        },
        "predicted": plan.predicted.model_dump(),
        "solver": plan.solver.model_dump(),
    }


def _run_dir(plan_path: Path, backend: str, run_dir: Path | None, node_rank: int = 0) -> Path:
    """The run directory: ``--run-dir`` when given (refused if it is a file or already holds a run, unless
    it is a node other than 0 of a multi-node run, whose run directory node 0 may already use), else
    ``runs/<plan>-<backend>``, or the first ``runs/<plan>-<backend>-N`` that holds no earlier run.

    Raises:
        LaunchError: ``--run-dir`` is a file, or a directory with an earlier run's metrics.jsonl or train.log;
            a node rank above 0 without ``--run-dir``.
    """
    from paraplan.backends.launch import LOG_FILE
    from paraplan.backends.train_common import METRICS_FILE

    def used(d: Path) -> bool:
        # A multi-node run's directory holds every node's log: only this node's counts.
        return (d / METRICS_FILE).exists() or (d / LOG_FILE).exists() or (d / f"train.node{node_rank}.log").exists()

    shared = node_rank > 0
    if shared and run_dir is None:
        raise LaunchError("--node-rank > 0: give the run directory node 0 uses with --run-dir (on a shared file "
                          "system, or the same path on every node)")
    if run_dir is not None:
        if run_dir.exists() and not run_dir.is_dir():
            raise LaunchError(f"--run-dir {run_dir} is a file; give a directory (it is created if missing)")
        if run_dir.is_dir() and used(run_dir) and not shared:
            raise LaunchError(f"--run-dir {run_dir} holds an earlier run (metrics.jsonl / train.log); give a new "
                              "directory or delete that one")
        return run_dir
    base = Path("runs") / f"{plan_path.stem}-{backend}"
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or used(candidate)):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    if candidate != base:
        err_console.print(f"{base} holds an earlier run; this run goes to {candidate}", highlight=False)
    return candidate


@app.command("launch")
@_guard
def launch_cmd(
    plan_path: Annotated[Optional[Path], typer.Argument(
        help="plan.json from `paraplan plan` (with --resume: optional, a new plan to continue with).")] = None,
    backend: Annotated[Optional[str], typer.Option(
        help="deepspeed or torch (default torch; with --resume the run's).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Optimizer steps in all (default 20; with --resume the run's).", min=1)] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Text files or directories (repeatable); default: "
                                                           "the Python standard library's sources.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(
        help="Run directory (default runs/<plan>-<backend>, or runs/<plan>-<backend>-N when that holds a run).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Write the files and print every node's command only.")] = False,
    nvme_path: Annotated[Optional[Path], typer.Option(
        help="Directory on a local NVMe drive for the states the plan offloads to NVMe and activations paged to "
             "disk (deepspeed backend; default: the cluster file's nvme_path, and the run directory for "
             "activations). Required when the plan puts optimizer states or parameters on NVMe.")
    ] = None,
    node_rank: Annotated[int, typer.Option(help="This node's rank, 0..nodes-1 (multi-node plans).", min=0)] = 0,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(
        help="HOST:PORT of node 0 for torchrun's c10d rendezvous; required to run a multi-node plan.")] = None,
    rdzv_id: Annotated[Optional[str], typer.Option(
        help="Rendezvous id, the same on every node (default paraplan-<run directory name>).")] = None,
    hosts: Annotated[Optional[str], typer.Option(
        help="Comma-separated host names of the nodes, for DeepSpeed's hostfile.")] = None,
    slurm: Annotated[bool, typer.Option(
        help="Write the run directory with its SLURM batch script and print how to submit it; start nothing.")
    ] = False,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Save a checkpoint every N steps and after the last (0: never).", min=0)] = None,
    max_restarts: Annotated[Optional[int], typer.Option(
        help="Restart the job up to N times after a rank fails, each from the last complete checkpoint.", min=0)
    ] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue the run in this run directory from its latest complete checkpoint (metrics appended).")
    ] = None,
    phases: Annotated[bool, typer.Option(
        help="Profile step 2 (torch.profiler) and record its forward, backward, optimizer and per-collective "
             "times in metrics.jsonl, for `paraplan calibrate`.")] = False,
    calibrate: Annotated[bool, typer.Option(
        help="First run a few steps of the top plans (RUN_DIR/trials), calibrate the cost model on them "
             "(RUN_DIR/calibration.json), re-plan (RUN_DIR/plan.calibrated.json) and train that plan.")] = False,
    calibrate_top: Annotated[int, typer.Option(help="With --calibrate: plans to try.", min=1)] = 2,
    calibrate_steps: Annotated[int, typer.Option(help="With --calibrate: steps per trial.", min=3)] = 6,
) -> None:
    """Write DeepSpeed or native torch launch files for a plan and train with torchrun, on one node or many."""
    import shlex

    from paraplan.backends.jobscripts import DEFAULT_RDZV_PORT, launch_command
    from paraplan.backends.launch import launch_plan

    previous = _previous_launch(resume) if resume is not None else None
    if plan_path is None and resume is None:
        raise LaunchError("give a plan.json (from `paraplan plan ... -o plan.json`), or --resume RUN_DIR")
    if backend is None:
        backend = previous.backend if previous is not None else "torch"
    if backend not in ("deepspeed", "torch"):
        raise LaunchError(f"--backend {backend}: use deepspeed or torch")
    if previous is not None and backend != previous.backend:
        raise LaunchError(f"--resume {resume}: that run used the {previous.backend} backend, whose checkpoints the "
                          f"{backend} backend cannot read; resume with --backend {previous.backend}")
    if resume is not None and run_dir is not None and run_dir.absolute() != resume.absolute():
        raise LaunchError("--resume continues in its own run directory; drop --run-dir")
    source = plan_path if plan_path is not None else resume / "plan.json"  # type: ignore[operator]
    plan = read_model(source, Plan, "plan", LaunchError, f"run `paraplan plan ... -o {source}` first")
    if previous is not None:
        steps = steps if steps is not None else previous.steps
        data = data if data else previous.data_paths
        checkpoint_every = checkpoint_every if checkpoint_every is not None else previous.checkpoint_every
        max_restarts = max_restarts if max_restarts is not None else previous.max_restarts
        run = resume
    else:
        run = _run_dir(source, backend, run_dir, node_rank)
    host_list = [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None
    if host_list is not None and len(host_list) != plan.cluster.nodes:
        raise LaunchError(f"--hosts names {len(host_list)} host(s); the plan has {plan.cluster.nodes} node(s)")
    endpoint = rdzv_endpoint
    if endpoint is None and host_list is not None and plan.cluster.nodes > 1:
        endpoint = f"{host_list[0]}:{DEFAULT_RDZV_PORT}"
    assert run is not None
    if calibrate:
        if previous is not None or dry_run or slurm or plan.cluster.nodes > 1:
            raise LaunchError("--calibrate runs trial steps here first: not with --resume, --dry-run, --slurm or a "
                              "multi-node plan")
        from paraplan.backends.trial import calibrate_by_trial

        trial = calibrate_by_trial(plan, backend, run, top_k=calibrate_top, steps=calibrate_steps, data=data)
        cal = trial.calibration
        console.print(f"calibrated on {len(trial.trial_dirs)} trial run(s) in {run / 'trials'}: compute x"
                      f"{cal.compute_scale_fwd:.2f} (forward) x{cal.compute_scale_bwd:.2f} (backward), link time "
                      f"x{cal.link_time_scale:.2f}, +{cal.step_overhead_s:.3f} s per step (RMS error on the trials: "
                      f"{cal.step_rms_rel_error:.0%}); re-planned: {run / 'plan.calibrated.json'}", highlight=False,
                      soft_wrap=True)
        plan = trial.plan
    from paraplan.backends.train_common import METRICS_FILE
    from paraplan.cli.progress import LaunchMonitor

    # On a terminal a live line (steps, loss, tokens/s from metrics.jsonl) replaces the job's own step lines.
    with LaunchMonitor(err_console, run / METRICS_FILE, steps or 20, quiet=dry_run or slurm) as monitor:
        spec, rows = launch_plan(
            plan, backend, run, steps=steps or 20, data=data, dry_run=dry_run or slurm,  # type: ignore[arg-type]
            quiet=monitor.active, nvme_path=nvme_path, node_rank=node_rank, rdzv_endpoint=endpoint,
            rdzv_id=rdzv_id, hosts=host_list, checkpoint_every=checkpoint_every or 0,
            max_restarts=max_restarts or 0, resume=resume is not None,
            before_write=(lambda: _keep_previous_plan(run, plan)) if previous is not None else None,
            phase_times=phases,
        )
    console.print(f"run directory: {run} ({', '.join(spec.files)}); how to start, resume and monitor it: "
                  f"{run / 'README.txt'}", highlight=False, soft_wrap=True)
    if slurm:
        console.print(f"submit with: sbatch {(run / 'launch.sbatch').absolute()}", highlight=False, soft_wrap=True)
        return
    if spec.nnodes > 1 and dry_run:
        console.print(f"{spec.nnodes} nodes: run on each node K (node 0's address as --rdzv-endpoint, the same "
                      "--run-dir on a shared file system):", highlight=False)
        for k in range(spec.nnodes):
            console.print(f"  node {k}: " + shlex.join(launch_command(source, spec, k)), highlight=False,
                          soft_wrap=True)
        console.print(f"  (each runs torchrun, the same command on every node: {' '.join(spec.command)}; `bash "
                      f"{run / 'commands.sh'} K` runs it without paraplan's checks)", highlight=False, soft_wrap=True)
        return
    console.print("command: " + " ".join(spec.command), highlight=False, soft_wrap=True)
    if not dry_run:
        from paraplan.cli.render import render_measured

        if rows or spec.nnodes == 1:
            render_measured(console, plan, rows)
        else:
            console.print(f"metrics.jsonl is written by global rank 0, on the node that holds it (in {run} when "
                          "the run directory is shared)", highlight=False)


def _previous_launch(run: Path):
    """The LaunchSpec of the run in ``run`` (``--resume``).

    Raises:
        LaunchError: ``run`` is not a run directory written by `paraplan launch`.
    """
    from paraplan.types import LaunchSpec

    if not run.is_dir() or not (run / "launch.json").is_file() or not (run / "plan.json").is_file():
        raise LaunchError(f"--resume {run}: not a run directory of `paraplan launch` (it needs plan.json and "
                          "launch.json); give the directory of the run to continue")
    return read_model(run / "launch.json", LaunchSpec, "launch spec", LaunchError,
                      "give the directory of a run started by `paraplan launch`")


def _keep_previous_plan(run: Path, plan: Plan) -> None:
    """Before a resume replaces ``plan.json`` with a different plan, keep the old one as ``plan.previous-N.json``."""
    old = (run / "plan.json").read_text()
    if Plan.model_validate_json(old) == plan:
        return
    n = 1
    while (run / f"plan.previous-{n}.json").exists():
        n += 1
    write_atomic(run / f"plan.previous-{n}.json", old)


# `estimate` lives in its own module; it registers itself on this app with the same error guard.
from paraplan.cli import estimate as _estimate  # noqa: E402

_estimate.register(app, _guard)
from paraplan.cli import explain as _explain  # noqa: E402

_explain.register(app, _guard)
from paraplan.cli import report as _report  # noqa: E402

_report.register(app, _guard)
from paraplan.cli import calibrate as _calibrate  # noqa: E402

_calibrate.register(app, _guard)


def main() -> None:
    """Console-script entry point: run the app, then make sure stdout was really written.

    Output that could not be written (a closed pipe, a full disk behind a redirect) is reported in one line on
    stderr with exit code 1 instead of Python's "Exception ignored" message at shutdown.
    """
    try:
        app(prog_name="paraplan")
    finally:
        _flush_stdout()


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as exc:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's own flush at exit cannot fail again
        if exc.errno != errno.EPIPE:  # a reader that went away (| head) is not an error worth a message
            sys.stderr.write(f"error: cannot write output: {exc.strerror}\n")
        sys.exit(1)
