"""Measure what tensor parallelism and ZeRO-3 cost in each backend beyond their priced compute and collectives.

A single-process profile cannot see the framework work of a sharded layer: DTensor dispatch and redistribution
around every tensor-parallel projection, the processes waiting for each other at each of a block's collectives,
and the hooks and coordination of a ZeRO-3 parameter fetch (FSDP2's copy-in / copy-out, DeepSpeed's parameter
coordinator). On cpu:2 these are most of the error of an uncalibrated prediction of tp and ZeRO-3 runs (tens of
milliseconds per block per micro-batch, benchmarks/results/calibration.md), and a calibration on dp and pp runs
alone cannot identify them. This module times them in two processes on a few of the model's blocks, the way each
backend runs them; the profile carries the results (``ModelProfile.backend_overheads``), from which the cost model
derives its uncalibrated ``tp_block_overhead_s`` and ``zero3_fetch_overhead_s``; a calibration on runs that
exercise a mechanism replaces them.

What is timed (:func:`_worker`): one micro-batch of ``micro_batch_size x seq_len`` through ``blocks`` blocks,
forward and the backward of ``output.sum()``, the slower rank's wall time; each backend's pass right after a pass
of its reference (so the machine's drift cancels), and the median over ``repeats`` pairs (after ``warmup``) of
the extra time over the reference:

- ``torch_tp``: the blocks sharded over the 2 ranks with the torch backend's DTensor plan
  (``torch_native.LLAMA_TP_PLAN``; no sequence parallelism), against the same blocks at half width as plain
  modules (heads, kv heads and FFN width halved: tp = 2's compute, both processes computing at once);
- ``torch_zero3``: the blocks under FSDP2 ``fully_shard(reshard_after_forward=True)`` over 2 ranks, one unit per
  block and the root as the torch backend wraps them (each pass gathers every block twice and reduce-scatters its
  gradient), against the full-width blocks as plain modules, each rank its own micro-batch;
- ``deepspeed_zero3``: the blocks in a DeepSpeed ZeRO-3 engine over 2 ranks with the backend's settings
  (``deepspeed.zero3_settings``: one-layer reduce bucket, reuse distance 0; torch AdamW; no accumulation boundary
  reached, so no optimizer step), against the plain full-width blocks;
- ``deepspeed_tp``: the blocks under DeepSpeed AutoTP training (``tensor_parallel.autotp_size = 2``) as the
  DeepSpeed backend configures it, against the plain half-width blocks.

The profile stores each extra time per backend (``BackendOverheads``); the cost model turns it into its two
overheads against its own prices of the collectives on the cluster it plans for
(``costs.CandidateCosts.framework_overhead``), so a calibration that re-prices the links keeps the measured total.
The compute under two processes sharing the machine cancels against the reference; it is the calibration's
compute scale, not an overhead.

Scope: CPU (gloo, ``cpu:2``) only; on CUDA nothing is measured yet (it needs two GPUs and the cluster the plan will
price; the overheads stay 0 there, as before). Dense llama blocks only (the backends' tensor-parallel plans).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paraplan.errors import ProfileError
from paraplan.types import BackendOverheads, ModelProfile, ModelSpec

N_RANKS = 2
MAX_BLOCKS = 16
PASS_BUDGET_S = 3.0  # profiled seconds of one pass's blocks (forward + backward), which caps their number
_TIMEOUT_S = 900.0


def profile_backend_overheads(profile: ModelProfile, blocks: int | None = None, warmup: int = 2,
                              repeats: int = 5, backends: tuple[str, ...] = ("torch", "deepspeed"),
                              ) -> dict[str, BackendOverheads]:
    """Time tp and ZeRO-3 overheads of ``profile``'s model in two processes on this machine (module docstring).

    Runs ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m paraplan.backends.overheads`` with
    the profile's thread count per process, at :func:`overhead_micro_batch` and the profile's sequence length and
    dtype; takes ``2 x (warmup + repeats)`` passes through ``blocks`` blocks per measurement (llama-tiny: about 40
    s, llama-small: about 3 minutes on cpu:2).

    Args:
        profile: a CPU profile with link measurements (``links=True``) of a dense llama model.
        blocks: blocks per timed pass (at most the model's); None: as many as the model has, at most
            :data:`MAX_BLOCKS` and as many as the profile's block times fit in :data:`PASS_BUDGET_S` (at least 2).
        warmup, repeats: untimed and timed passes per measurement.
        backends: which backends to measure ("torch", "deepspeed").

    Returns:
        backend name -> :class:`BackendOverheads` (extra seconds of a tp = 2 and of a ZeRO-3 pass).

    Raises:
        ProfileError: a GPU profile, a model this cannot build (MoE, custom), a profile without links, or a job
            that fails or does not finish within 15 minutes.
    """
    spec = profile.model
    if profile.device_kind != "cpu":
        raise ProfileError("backend overheads are measured on CPU (cpu:2) only so far; profile with "
                           "--no-overheads on a GPU")
    reason = unsupported_model(spec)
    if reason:
        raise ProfileError(f"{reason}; profile with --no-overheads")
    if not any(lk.name.startswith("allreduce_gloo") for lk in profile.links):
        raise ProfileError("backend overheads are priced against the profile's measured links: profile with --links "
                           "(or --no-overheads)")
    b = overhead_micro_batch(profile)
    if blocks is None:
        block = profile.layer("block", b)
        blocks = min(MAX_BLOCKS, max(2, int(PASS_BUDGET_S / max(block.fwd_time_s + block.bwd_time_s, 1e-9))))
    job = {"model": spec.model_dump(mode="json"), "dtype": profile.dtype, "seq_len": profile.seq_len,
           "micro_batch_size": b, "blocks": max(1, min(blocks, spec.n_layers)),
           "warmup": warmup, "repeats": repeats, "backends": list(backends)}
    times = _run_job(job, profile.cpu_threads or 1)
    return {name: BackendOverheads(tp_extra_s=times.get(f"{name}_tp"), zero3_extra_s=times.get(f"{name}_zero3"),
                                   micro_batch_size=b, blocks=job["blocks"])
            for name in backends}


def unsupported_model(spec: ModelSpec) -> str | None:
    """Why the overheads of ``spec`` cannot be timed (None: they can): dense llama models whose heads, kv heads and
    FFN width split over tp = 2, as the backends' tensor-parallel plans need."""
    if spec.family != "llama" or spec.moe is not None:
        return (f"backend overheads are timed for dense llama models (the backends' tensor-parallel plans), not "
                f"{spec.name}")
    if spec.n_heads % N_RANKS or spec.n_kv_heads % N_RANKS or spec.ffn_hidden % N_RANKS:
        return f"{spec.name}: heads, kv heads and FFN width must divide by tp = {N_RANKS} to time tensor parallelism"
    return None


def overhead_micro_batch(profile: ModelProfile) -> int:
    """The micro-batch the overheads are timed at: the middle of the profiled sizes (1,2,4 -> 2; 1,2 -> 2), one
    timing for all (DTensor dispatch and hooks do not grow with the micro-batch; the waits at collectives do)."""
    sizes = profile.micro_batch_sizes()
    return sizes[len(sizes) // 2]


def _run_job(job: dict, threads: int) -> dict[str, float]:
    from paraplan.backends.jobscripts import JOB_ENV

    env = {**os.environ, **JOB_ENV, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    # The ranks import paraplan from wherever this process did (it may run from a checkout, not installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory(prefix="paraplan-overheads-") as tmp:
        job_path, out_path, log_path = Path(tmp, "job.json"), Path(tmp, "times.json"), Path(tmp, "log.txt")
        job_path.write_text(json.dumps({**job, "output": str(out_path)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={N_RANKS}",
               "-m", "paraplan.backends.overheads", str(job_path)]
        with log_path.open("wb") as log:
            try:
                proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=_TIMEOUT_S,
                                      check=False)
            except subprocess.TimeoutExpired:
                raise ProfileError(f"timing backend overheads did not finish in {_TIMEOUT_S:.0f} s; profile with "
                                   "--no-overheads") from None
        if proc.returncode != 0 or not out_path.exists():
            lines = log_path.read_text(errors="replace").splitlines()
            errors = [line for line in lines if line.startswith("[rank0]:")]  # the failing rank's traceback
            tail = "\n".join((errors or lines)[-12:])
            raise ProfileError(f"timing backend overheads failed (exit {proc.returncode}): {tail}\nprofile with "
                               "--no-overheads to skip it")
        return json.loads(out_path.read_text())


# ---- the two ranks ---------------------------------------------------------------------------------------------

def _worker(job: dict) -> None:
    """One rank of the timing job (module docstring); rank 0 writes ``{measurement: seconds}`` to job["output"]."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from paraplan.models.build import build_layer, torch_dtype
    from paraplan.types import ModelSpec

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    spec = ModelSpec.model_validate(job["model"])
    dtype = torch_dtype(job["dtype"])
    n, b, s = job["blocks"], job["micro_batch_size"], job["seq_len"]
    warmup, repeats, backends = job["warmup"], job["repeats"], job["backends"]
    # Data-parallel passes (local, ZeRO-3) take each rank's own micro-batch; a tp group reads the same one
    # (DeepSpeed AutoTP checks it).
    x_dp = torch.randn(b, s, spec.hidden, generator=torch.Generator().manual_seed(1 + dist.get_rank()), dtype=dtype)
    x_tp = torch.randn(b, s, spec.hidden, generator=torch.Generator().manual_seed(0), dtype=dtype)

    def stack(model_spec) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[build_layer(model_spec, "block", i) for i in range(n)]).to(dtype)

    def fwd_bwd(module, x) -> None:
        module(x.clone().requires_grad_(True)).float().sum().backward()

    def one(step) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank sets the pace, as in a step
        return float(elapsed)

    def timed(step, reference) -> float:
        """Median extra time of ``step`` over ``reference``, each timed pass right after a reference pass (the
        machine's drift between measurements cancels in the pair)."""
        extra = []
        for i in range(warmup + repeats):
            ref = one(reference)
            t = one(step)
            if i >= warmup:
                extra.append(t - ref)
        return statistics.median(extra)

    full = stack(spec)
    half = spec.model_copy(update={"n_heads": spec.n_heads // N_RANKS, "n_kv_heads": spec.n_kv_heads // N_RANKS,
                                   "ffn_hidden": spec.ffn_hidden // N_RANKS, "head_dim": spec.hidden // spec.n_heads})
    local = stack(half)
    refs = {"tp": lambda: fwd_bwd(local, x_tp), "zero3": lambda: fwd_bwd(full, x_dp)}
    out: dict[str, float] = {}
    if "torch" in backends:
        out.update(_torch_times(stack(spec), stack(spec), lambda m: fwd_bwd(m, x_tp), lambda m: fwd_bwd(m, x_dp),
                                timed, refs))
    if "deepspeed" in backends:
        out.update(_deepspeed_times(spec, job, stack, x_dp, x_tp, timed, refs))
    if dist.get_rank() == 0:
        Path(job["output"]).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _torch_times(tp_stack, fsdp_stack, tp_pass, dp_pass, timed, refs) -> dict[str, float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from paraplan.backends.torch_native import LLAMA_TP_PLAN

    mesh = init_device_mesh("cpu", (N_RANKS,))
    styles = {"ColwiseParallel": ColwiseParallel, "RowwiseParallel": RowwiseParallel}
    for block in tp_stack:  # as torch_native.apply_tp without sequence parallelism
        parallelize_module(block, mesh, {name: styles[style]() for name, style in LLAMA_TP_PLAN.items()})
    out = {"torch_tp": timed(lambda: tp_pass(tp_stack), refs["tp"])}
    for block in fsdp_stack:  # as torch_native.apply_fsdp at ZeRO-3: one unit per block, then the root
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(fsdp_stack, mesh=mesh, reshard_after_forward=True)
    out["torch_zero3"] = timed(lambda: dp_pass(fsdp_stack), refs["zero3"])
    return out


def _deepspeed_times(spec, job: dict, stack, x_dp, x_tp, timed, refs) -> dict[str, float]:
    import deepspeed
    import torch.distributed as dist

    from paraplan.backends.deepspeed import ADAM_BETAS, ADAM_EPS, zero3_settings
    from paraplan.models.build import hf_config

    def config(**extra) -> dict:
        return {"train_micro_batch_size_per_gpu": job["micro_batch_size"],
                # never reached: every pass reduces its gradients, none runs the optimizer step
                "gradient_accumulation_steps": 10_000,
                "bf16": {"enabled": job["dtype"] == "bf16"}, "fp16": {"enabled": job["dtype"] == "fp16"},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                                                          "torch_adam": True}},
                "steps_per_print": 10**9, **extra}

    def engine_pass(engine, x) -> None:
        engine.backward(engine(x.clone().requires_grad_(True)).float().sum())

    out = {}
    model = stack(spec)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(
        zero_optimization={"stage": 3, **zero3_settings(spec, 1)}))
    out["deepspeed_zero3"] = timed(lambda: engine_pass(engine, x_dp), refs["zero3"])
    engine.destroy()
    dist.barrier()
    model = stack(spec)
    model.config = hf_config(spec)  # AutoTP reads head counts from model.config (as train_deepspeed.train_flat)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(
        zero_optimization={"stage": 0},
        tensor_parallel={"autotp_size": N_RANKS, "preset_model": "llama"}))
    out["deepspeed_tp"] = timed(lambda: engine_pass(engine, x_tp), refs["tp"])
    return out


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
