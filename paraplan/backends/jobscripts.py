"""The commands and scripts a run directory hands to a team: torchrun per node, a SLURM batch script, a DeepSpeed
hostfile and ``deepspeed`` command, and the run's ``README.txt``.

Nothing here launches anything; ``launch.launch_plan`` writes these files and runs this node's torchrun command.
Every launcher is an existing one:

- torchrun (``python -m torch.distributed.run``): ``--standalone`` on one node; across nodes the c10d rendezvous
  (``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID``), one agent per node, as in
  https://pytorch.org/docs/stable/elastic/run.html ("Multi-node multi-worker"). ``--max-restarts`` restarts the
  whole job after a failed worker (the trainers then resume from the last complete checkpoint), ``--log-dir`` with
  ``--tee 3`` keeps each rank's output in ``logs/`` as well as in the node's log.
- SLURM: one task per node (``#SBATCH --nodes``, ``--ntasks-per-node=1``, ``--gpus-per-node``), ``srun`` running
  the same torchrun command on every node with the rendezvous on the allocation's first host
  (``scontrol show hostnames "$SLURM_JOB_NODELIST"``) and ``$SLURM_JOB_ID`` as rendezvous id, as torchtitan's
  ``multinode_trainer.slurm`` and PyTorch's elastic docs do.
- DeepSpeed's own launcher: a hostfile (``HOST slots=N`` per line, https://www.deepspeed.ai/getting-started/
  "Resource Configuration (multi-node)") and ``deepspeed --hostfile ... --module ... --no_local_rank`` (the trainer
  reads LOCAL_RANK from the environment, so the launcher must not append ``--local_rank``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from paraplan.types import Backend, LaunchSpec, Plan

DEFAULT_RDZV_PORT = 29500
# The rendezvous host written into a multi-node run's commands when none was given (a dry run, --slurm).
PLACEHOLDER_HOST = "NODE0_HOST"
LOGS_DIR = "logs"
SLURM_FILE = "launch.sbatch"
HOSTFILE = "hostfile"
COMMANDS_FILE = "commands.sh"
README_FILE = "README.txt"
# Environment every launch sets for the ranks. torchrun's agent otherwise shares its rendezvous TCPStore with the
# workers; after a restart on gloo the new workers then fail to connect ("Gloo connectFullMesh failed") or hang
# (measured, ../shared/PLATFORM.md), so workers get a store of their own.
#
# MALLOC_MMAP_THRESHOLD_: glibc serves allocations above the threshold with mmap and returns them to the system when
# freed, but by default raises the threshold each time such a block is freed (mallopt(3), M_MMAP_THRESHOLD: dynamic
# adjustment, up to 32 MiB), so buffers allocated and freed every micro-batch (ZeRO-3's all-gathered blocks,
# activations) end up in the heap, where fragmentation keeps them resident. Measured on cpu:2, llama-small, FSDP2
# ZeRO-3 (benchmarks/calibration.py): peak RSS grew every step to 5.0 GiB per rank (dp=2 without ZeRO: 3.2 GiB);
# with the threshold fixed at 4 MiB (setting it turns the adjustment off) it stays at 1.8 GiB, the 1.6 GiB the
# memory model predicts plus the runtime, and steps are no slower (10.0 vs 10.7-12.6 s; a 64 KiB threshold gave
# 1.5 GiB but 13-15 s steps from page faults). Host memory of offloading plans on GPU nodes is held to it the same.
JOB_ENV = {"PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "MALLOC_MMAP_THRESHOLD_": "4194304"}


def trainer_module(backend: Backend) -> str:
    return f"paraplan.backends.train_{backend}"


def torchrun_command(
    backend: Backend, run_dir: Path | str, nnodes: int, nproc_per_node: int, *, rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None, max_restarts: int = 0, log_dir: Path | str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun command one node runs.

    Args:
        rdzv_endpoint: ``HOST:PORT`` of the c10d rendezvous; None (one node only) runs ``--standalone``.
        rdzv_id: the job's id, the same on every node (required with ``rdzv_endpoint``).
        max_restarts: torchrun's ``--max-restarts``.
        log_dir: torchrun's ``--log-dir`` (per-rank stdout/stderr files), with ``--tee 3``.
        python: the interpreter (``python -m torch.distributed.run`` is torchrun, found without PATH).

    Raises:
        ValueError: several nodes without a rendezvous endpoint and id.
    """
    command = [python, "-m", "torch.distributed.run"]
    if rdzv_endpoint is None:
        if nnodes != 1:
            raise ValueError(f"{nnodes} nodes need a rendezvous endpoint")
        command.append("--standalone")
    else:
        if rdzv_id is None:
            raise ValueError("a rendezvous endpoint needs a rendezvous id")
        # No --node-rank: the c10d rendezvous assigns node and process ranks itself (torchrun ignores it, warning).
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    command.append(f"--nproc-per-node={nproc_per_node}")
    if max_restarts:
        command.append(f"--max-restarts={max_restarts}")
    if log_dir is not None:
        command += [f"--log-dir={log_dir}", "--tee=3"]
    return command + ["-m", trainer_module(backend), "--run-dir", str(run_dir)]


def node_log_name(nnodes: int, node_rank: int) -> str:
    """The node's combined log in the run directory: ``train.log`` on one node, ``train.node<K>.log`` on several
    (nodes may share the run directory)."""
    return "train.log" if nnodes == 1 else f"train.node{node_rank}.log"


def commands_script(spec: LaunchSpec, workdir: Path) -> str:
    """``commands.sh``: this run's bare torchrun command (the same on every node), ``bash commands.sh K`` on node K,
    its output appended to the node's log. Without a rendezvous endpoint it asks for ``NODE0_HOST``."""
    env = " ".join(f"{k}={v}" for k, v in JOB_ENV.items())
    command = shlex.join(spec.command).replace(
        f"--rdzv-endpoint={PLACEHOLDER_HOST}:",
        f'--rdzv-endpoint="${{{PLACEHOLDER_HOST}:?set {PLACEHOLDER_HOST} to the address of node 0}}":')
    log = str(Path(spec.run_dir) / node_log_name(spec.nnodes, 0)).replace("train.node0.log", "train.node$node.log")
    return "\n".join([
        "#!/bin/bash",
        "# This run's bare torchrun command, the same on every node: `bash commands.sh K` on node K (`paraplan "
        "launch` runs it after its checks).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        "node=${1:-0}",
        f'if ! [ "$node" -ge 0 ] 2>/dev/null || [ "$node" -ge {spec.nnodes} ]; then',
        f'  echo "node rank $node: this run has {spec.nnodes} node(s), 0..{spec.nnodes - 1}" >&2; exit 1',
        "fi",
        f'env {env} {command} 2>&1 | tee -a "{log}"',
    ]) + "\n"


def slurm_script(plan: Plan, backend: Backend, run_dir: Path, max_restarts: int, workdir: Path,
                 port: int = DEFAULT_RDZV_PORT, python: str = sys.executable) -> str:
    """A SLURM batch script that runs the plan on ``plan.cluster.nodes`` nodes: one torchrun agent per node via
    ``srun``, the rendezvous on the allocation's first host.

    Args:
        run_dir: the run directory, made absolute (it must be on a file system every node sees).
        workdir: the directory the job runs in (the launcher's current directory).
        port: the rendezvous port on the first host (the job's ``PARAPLAN_RDZV_PORT`` overrides it).
    """
    cluster = plan.cluster
    run = run_dir.absolute()
    lines = [
        "#!/bin/bash",
        f"# paraplan: {plan.model.name} on {cluster.name}, {backend} backend. Submit with: sbatch {run / SLURM_FILE}",
        f"#SBATCH --job-name=paraplan-{run.name}",
        f"#SBATCH --nodes={cluster.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if cluster.device.kind == "cuda":
        lines.append(f"#SBATCH --gpus-per-node={cluster.devices_per_node}")
    lines += [
        "#SBATCH --exclusive",
        f"#SBATCH --output={run}/slurm-%j.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir.absolute()))}",
        f'if [ "${{SLURM_NNODES}}" != "{cluster.nodes}" ]; then',
        f'  echo "this plan needs {cluster.nodes} node{"s" if cluster.nodes > 1 else ""}; the allocation has '
        '${SLURM_NNODES}" >&2; exit 1',
        "fi",
        *(f"export {k}={v}" for k, v in JOB_ENV.items()),
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    ]
    torchrun = torchrun_command(
        backend, run, cluster.nodes, cluster.devices_per_node,
        rdzv_endpoint=f"$head_node:${{PARAPLAN_RDZV_PORT:-{port}}}",
        rdzv_id="$SLURM_JOB_ID", max_restarts=max_restarts, log_dir=run / LOGS_DIR, python=python,
    )
    # srun starts one task per node, each the same torchrun agent, its output in train.node<K>.log.
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--output={run}/train.node%n.log"]
    lines.append(" ".join(srun + [_bash_arg(a) for a in torchrun]))
    return "\n".join(lines) + "\n"


def _bash_arg(arg: str) -> str:
    """``arg`` quoted for bash, its ``$VAR`` expansions kept (the SLURM variables exist only inside the job)."""
    if "$" not in arg:
        return shlex.quote(arg)
    key, eq, value = arg.partition("=")
    return f'{key}="{value}"' if eq else f'"{arg}"'


def deepspeed_hostfile(hosts: list[str], slots: int) -> str:
    """DeepSpeed's hostfile: ``HOST slots=N`` per node."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def deepspeed_command(run_dir: Path, master_addr: str, nnodes: int, port: int = DEFAULT_RDZV_PORT) -> list[str]:
    """DeepSpeed's launcher over the hostfile in ``run_dir`` (it reaches the other nodes with pdsh/ssh and starts
    ``slots`` ranks on each, every one running the DeepSpeed trainer). On one node ``--no_ssh_check``: DeepSpeed
    otherwise refuses a hostfile whose only host does not accept ssh to itself (runner.py), though it launches
    locally."""
    run = run_dir.absolute()
    return ["deepspeed", f"--hostfile={run / HOSTFILE}", *(["--no_ssh_check"] if nnodes == 1 else []),
            f"--master_addr={master_addr}", f"--master_port={port}", "--no_local_rank", "--module",
            trainer_module("deepspeed"), "--run-dir", str(run)]


def launch_command(plan_path: Path | str, spec: LaunchSpec, node_rank: int) -> list[str]:
    """The ``paraplan launch`` command node ``node_rank`` runs for this run (it checks the plan and the node before
    starting torchrun)."""
    args = ["paraplan", "launch", str(plan_path), "--backend", spec.backend, "--steps", str(spec.steps),
            "--run-dir", spec.run_dir]
    if spec.nnodes > 1:
        args += ["--node-rank", str(node_rank), "--rdzv-endpoint", str(spec.rdzv_endpoint), "--rdzv-id",
                 str(spec.rdzv_id)]
    if spec.checkpoint_every:
        args += ["--checkpoint-every", str(spec.checkpoint_every)]
    if spec.max_restarts:
        args += ["--max-restarts", str(spec.max_restarts)]
    return args


def run_readme(plan: Plan, spec: LaunchSpec, deepspeed_launch: list[str] | None) -> str:
    """``README.txt`` of the run directory: what is in it and how to start, resume and monitor the run."""
    cluster, st, run_dir = plan.cluster, plan.strategy, Path(spec.run_dir)
    nodes = cluster.nodes
    out = [
        f"paraplan run: {plan.model.name} on {cluster.name} ({nodes} node{'s' if nodes > 1 else ''} x "
        f"{cluster.devices_per_node} process{'es' if cluster.devices_per_node > 1 else ''}), {spec.backend} backend",
        f"strategy: dp={st.dp} tp={st.tp} pp={st.pp} cp={st.cp} ZeRO-{st.zero_stage}, micro-batch "
        f"{st.micro_batch_size} x {st.grad_accum} accumulation, global batch {plan.train.global_batch} x "
        f"seq {plan.train.seq_len}, {spec.steps} steps",
        f"predicted: {plan.predicted.step_time_s:.3f} s per step, "
        f"{plan.predicted.peak_memory_bytes / 2**30:.2f} GiB peak per device",
        "",
        "Files",
        "  plan.json            the plan (paraplan plan)",
        "  launch.json          steps, data, checkpointing, restarts, this node's command",
        "  ds_config.json       DeepSpeed config" if spec.backend == "deepspeed" else
        "  torch_parallel.json  the native torch recipe (mesh, TP plan, FSDP2/DDP, pipeline schedule)",
        f"  {COMMANDS_FILE:<20} the bare torchrun command of every node (bash {COMMANDS_FILE} K runs node K's)",
        f"  {SLURM_FILE:<20} SLURM batch script",
    ]
    if deepspeed_launch is not None:
        out.append(f"  {HOSTFILE:<20} DeepSpeed hostfile (HOST slots=N; check the host names)")
    out += [
        "  metrics.jsonl        one JSON row per step from global rank 0 (loss, step time, tokens/s, peak memory per",
        "                       rank); resumes and restarts append ('restart' counts torchrun's restarts)",
        "  train.log            this node's output (train.node<K>.log per node when there are several)",
        "  logs/                each rank's stdout/stderr, per torchrun attempt: logs/<id>/attempt_<n>/<local rank>/",
        "  checkpoints/         step_<k>/ per checkpoint (complete only with its COMPLETE.json marker)",
        "",
        "Start",
    ]
    plan_path = run_dir / "plan.json"
    if nodes == 1:
        out.append("  " + shlex.join(launch_command(plan_path, spec, 0)))
    else:
        out.append("  on each node K (node 0's address as the rendezvous endpoint; the run directory on a file system "
                   "every node sees):")
        out += [f"    node {k}: {shlex.join(launch_command(plan_path, spec, k))}" for k in range(nodes)]
    out.append(f"  or the bare torchrun command:  bash {run_dir / COMMANDS_FILE} K")
    out.append(f"  or under SLURM:  sbatch {run_dir.absolute() / SLURM_FILE}")
    if deepspeed_launch is not None:
        out.append("  or with DeepSpeed's launcher (pdsh/ssh to the hostfile's hosts):  "
                   + " ".join(shlex.quote(a) for a in deepspeed_launch))
    out += [
        "",
        "Checkpoints and resume",
        (f"  a checkpoint every {spec.checkpoint_every} steps and after the last" if spec.checkpoint_every else
         "  no checkpoints (launch with --checkpoint-every N)"),
        (f"  a failed rank restarts the job up to {spec.max_restarts} times, from the last complete checkpoint"
         if spec.max_restarts else "  no automatic restarts (launch with --max-restarts N)"),
        f"  resume after a stop:  paraplan launch --resume {run_dir}",
        f"  with another plan:    paraplan launch NEW_PLAN.json --resume {run_dir}   (torch backend: the checkpoint",
        "                        is resharded to the new degrees)",
        "",
        "Monitor",
        f"  tail -f {run_dir / node_log_name(nodes, 0)}",
        f"  tail -f {run_dir / 'metrics.jsonl'}",
    ]
    return "\n".join(out) + "\n"
