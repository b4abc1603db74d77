"""The ``paraplan`` command line: models, profile, plan, launch. Thin commands over the library.

Errors a user can fix (ParaplanError, pydantic ValidationError) print a short message and exit 1; other
exceptions keep their traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from paraplan.errors import ParaplanError, ProfileError, StrategyError, format_validation_error
from paraplan.files import read_model, write_atomic
from paraplan.types import Plan, StrategyOverride, TrainSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
# Piped output (CI logs, tests) gets a wide table instead of rich's 80-column default.
_WIDTH = shutil.get_terminal_size((160, 24)).columns
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _guard(func):
    """Render user errors as a message + exit 1."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ParaplanError as exc:
            _fail(str(exc))
        except ValidationError as exc:
            _fail(format_validation_error("input", exc))

    return wrapper


_STRATEGY_KEYS = {"dp": "dp", "tp": "tp", "pp": "pp", "mb": "micro_batch_size", "micro_batch": "micro_batch_size",
                  "zero": "zero_stage", "offload": "offload_optimizer", "recompute": "recompute"}


def parse_strategy(text: str | None) -> StrategyOverride:
    """``dp=2,tp=1,pp=2,mb=4,zero=3,offload=true,recompute=full`` -> StrategyOverride.

    The values are validated by :class:`StrategyOverride`: positive integers for dp, tp, pp and mb, 0-3 for zero,
    a boolean (true/false, yes/no, on/off, 1/0) for offload, none or full for recompute.

    Raises:
        StrategyError: an unknown key, a part without ``=``, or a value its field does not accept.
    """
    if not text:
        return StrategyOverride()
    fields: dict[str, str] = {}
    written: dict[str, str] = {}  # field -> the key=value the user wrote, for the error message
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in _STRATEGY_KEYS:
            raise StrategyError(f"--strategy '{part}': write key=value with keys {', '.join(_STRATEGY_KEYS)}")
        fields[_STRATEGY_KEYS[key]] = value
        written[_STRATEGY_KEYS[key]] = part.strip()
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
def models_cmd() -> None:
    """List model presets with their parameter counts."""
    from rich.table import Table

    from paraplan.cost_models.transformer import model_params
    from paraplan.models.presets import PRESETS
    from paraplan.units import format_count

    table = Table(title="model presets")
    for col in ("name", "family", "params", "layers", "hidden", "ffn", "heads", "kv heads", "vocab"):
        table.add_column(col, justify="right" if col not in ("name", "family") else "left")
    for name, s in PRESETS.items():
        table.add_row(name, s.family, format_count(model_params(s)), str(s.n_layers), str(s.hidden),
                      str(s.ffn_hidden), str(s.n_heads), str(s.n_kv_heads), str(s.vocab))
    console.print(table)


@app.command("profile")
@_guard
def profile_cmd(
    model: Annotated[str, typer.Argument(help="Preset, model/config file, or package.module:factory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the profile JSON.")] = Path(
        "profile.json"),
    micro_batches: Annotated[str, typer.Option(help="Comma-separated micro-batch sizes.")] = "1,2,4",
    seq_len: Annotated[int, typer.Option(help="Sequence length (tokens).")] = 128,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    warmup: Annotated[int, typer.Option(help="Untimed runs per measurement.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (median reported).")] = 5,
    links: Annotated[bool, typer.Option(help="Also measure copy and collective bandwidth.")] = True,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU only: torch threads while profiling. Use what each training process gets: cores / processes "
             "(`launch` runs cpu:N with that many).")] = None,
) -> None:
    """Measure per-layer forward/backward time, parameter and activation memory and FLOPs on this device."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from paraplan.models.presets import load_model_spec
    from paraplan.profiler import profile_model

    spec = load_model_spec(model)
    try:
        sizes = [int(x) for x in micro_batches.split(",") if x.strip()]
    except ValueError:
        raise ProfileError(f"--micro-batches {micro_batches}: write comma-separated integers, e.g. 1,2,4") from None
    if threads is not None:
        if threads < 1:
            raise ProfileError("--threads must be >= 1")
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
    write_atomic(output, prof.model_dump_json(indent=2))
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


def load_profile(path: Path | None):
    """The ModelProfile in ``path`` (None for None). Whether it suits the model, sequence length and dtype is
    checked by the library (``ModelProfile.check_matches``) when it is used."""
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
    from paraplan.backends.launch import cpu_threads_per_process

    if prof is None or prof.device_kind != "cpu" or clus.device.kind != "cpu" or prof.cpu_threads is None:
        return
    want = cpu_threads_per_process(clus.devices_per_node)
    if prof.cpu_threads != want:
        err_console.print(f"[yellow]warning:[/] the profile used {prof.cpu_threads} threads; each of the "
                          f"{clus.devices_per_node} processes of {clus.name} gets {want}. Re-profile with "
                          f"--threads {want} for accurate times.", highlight=False)


@app.command("plan")
@_guard
def plan_cmd(
    model: Annotated[str, typer.Argument(help="Preset, model/config file, or package.module:factory.")],
    cluster: Annotated[str, typer.Option(help="cpu:N, 8xH100-80GB, 4x8xA100-80GB or a cluster file.")],
    global_batch: Annotated[int, typer.Option(help="Sequences per optimizer step.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")],
    profile: Annotated[Optional[Path], typer.Option(help="Profile from `paraplan profile`.")] = None,
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on GPU), bf16, fp16 or fp32.")] = "auto",
    strategy: Annotated[Optional[str], typer.Option(help="Force parts: dp=2,tp=1,pp=1,mb=2,zero=3,recompute=full")
                        ] = None,
    backend: Annotated[str, typer.Option(help="Backend(s) the plan must run on: any (both), deepspeed, torch, or "
                                              "unconstrained (cost only, e.g. GPT with tp).")] = "any",
    top: Annotated[int, typer.Option("--top", help="Plans to show.")] = 5,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    time_limit: Annotated[float, typer.Option(help="MILP time limit per candidate (s).")] = 10.0,
    memory_fraction: Annotated[float, typer.Option(
        help="Share of device memory a plan may fill (headroom for fragmentation).", min=0.1, max=1.0)] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead of the table.")] = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the best plan.")] = Path("plan.json"),
) -> None:
    """Search dp x tp x pp x micro-batch, stage assignment, ZeRO, checkpointing and offload for the fastest plan."""
    from paraplan.catalog import load_cluster_spec
    from paraplan.models.presets import load_model_spec
    from paraplan.planner.search import search_plans

    if backend not in ("any", "deepspeed", "torch", "unconstrained"):
        raise StrategyError(f"--backend {backend}: use any, deepspeed, torch or unconstrained")
    spec = load_model_spec(model)
    clus = load_cluster_spec(cluster)
    dtype = resolve_dtype(dtype, clus)
    train = TrainSpec(global_batch=global_batch, seq_len=seq_len, dtype=dtype, lr=lr)  # type: ignore[arg-type]
    prof = load_profile(profile)
    plans = search_plans(spec, clus, train, prof, parse_strategy(strategy), top_k=top, backend=backend,
                         time_limit_s=time_limit, profile_path=str(profile) if profile else None,
                         memory_fraction=memory_fraction)
    _warn_thread_mismatch(prof, clus)
    write_atomic(output, plans[0].model_dump_json(indent=2))
    if as_json:
        print(json.dumps(plan_summary(plans[0]), indent=2))
        return
    from paraplan.cli.render import render_plans

    render_plans(console, plans)
    console.print(f"wrote {output}")


def plan_summary(plan: Plan) -> dict:
    """The ``--json`` summary: ``strategy.*`` and ``predicted.*`` plus the solver's status."""
    s = plan.strategy
    return {
        "model": plan.model.name, "cluster": plan.cluster.name,
        "strategy": {
            "dp": s.dp, "tp": s.tp, "pp": s.pp, "micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum,
            "zero_stage": s.zero_stage, "offload_optimizer": s.offload_optimizer,
            "recompute_blocks": [st.recompute_blocks for st in s.stages],
            "stage_blocks": [st.n_blocks for st in s.stages],
        },
        "predicted": plan.predicted.model_dump(),
        "solver": plan.solver.model_dump(),
    }


@app.command("launch")
@_guard
def launch_cmd(
    plan_path: Annotated[Path, typer.Argument(help="plan.json from `paraplan plan`.")],
    backend: Annotated[str, typer.Option(help="deepspeed or torch.")] = "torch",
    steps: Annotated[int, typer.Option(help="Optimizer steps to train.")] = 20,
    data: Annotated[Optional[list[str]], typer.Option(help="Text files or directories (repeatable); default: "
                                                           "the Python standard library's sources.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<plan>-<backend>).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Write the files and print the command only.")] = False,
) -> None:
    """Write DeepSpeed or native torch launch files for a plan and train with torchrun."""
    from paraplan.backends.launch import launch_plan
    from paraplan.errors import LaunchError

    if backend not in ("deepspeed", "torch"):
        raise LaunchError(f"--backend {backend}: use deepspeed or torch")
    if steps < 1:
        raise LaunchError("--steps must be >= 1")
    plan = read_model(plan_path, Plan, "plan", LaunchError, f"run `paraplan plan ... -o {plan_path}` first")
    run = run_dir or Path("runs") / f"{plan_path.stem}-{backend}"
    spec, rows = launch_plan(plan, backend, run, steps=steps, data=data, dry_run=dry_run)  # type: ignore[arg-type]
    console.print(f"run directory: {run} ({', '.join(spec.files)})")
    console.print("command: " + " ".join(spec.command), highlight=False, soft_wrap=True)
    if not dry_run:
        from paraplan.cli.render import render_measured

        render_measured(console, plan, rows)


# `estimate` lives in its own module; it registers itself on this app with the same error guard.
from paraplan.cli import estimate as _estimate  # noqa: E402

_estimate.register(app, _guard)


def main() -> None:
    app(prog_name="paraplan")
