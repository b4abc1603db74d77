"""Issue 7: clean machine-readable output, safe output files, no tracebacks, inputs validated at the boundary,
messages that say which rule failed. One test (or table) per class of defect; each failed on the main before it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error, make_plan, run_cli as run
from paraplan.files import write_atomic

REPO = Path(__file__).resolve().parents[2]
PLAN_TINY = ("plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64")


def paraplan(*args: str, cwd: Path | None = None, stdout=subprocess.PIPE, timeout: float = 300):
    """The real console script (``python -m paraplan`` runs ``paraplan.cli.app:main``), in a subprocess."""
    return subprocess.run([sys.executable, "-m", "paraplan", *args], cwd=cwd, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    """A CPU profile of llama-tiny at seq 64 (one repeat, no links: fast)."""
    out = tmp_path_factory.mktemp("prof") / "profile.json"
    result = run("profile", "llama-tiny", "--seq-len", "64", "--micro-batches", "1,2,4", "--warmup", "0",
                 "--repeats", "1", "--no-links", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


# --- 1. --json is JSON, whatever the solver prints -------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("plan", "llama3-8b", "--cluster", "8xH100-80GB", "--global-batch", "256", "--seq-len", "4096", "--json"),
    ("estimate", "llama3-8b", "--cluster", "8xH100-80GB", "--global-batch", "256", "--seq-len", "4096", "--tp", "1",
     "--pp", "1", "--dp", "8", "--micro-batch", "1", "--json"),
    ("models", "--json"),
], ids=["plan", "estimate", "models"])
def test_json_stdout_is_only_json_through_the_console_script(tmp_path, args):
    extra = ("-o", str(tmp_path / "plan.json")) if args[0] == "plan" else ()
    result = paraplan(*args, *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # the whole of stdout parses: no solver banner, no log line, no table


def test_profile_json_summary_is_clean(tmp_path):
    out = tmp_path / "p.json"
    result = paraplan("profile", "llama-tiny", "--seq-len", "32", "--micro-batches", "1", "--warmup", "0",
                      "--repeats", "1", "--no-links", "--json", "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [lp["kind"] for lp in summary["layers"]] == ["embed", "block", "head"]
    assert json.loads(out.read_text())["schema_version"] == 1


# --- 3. -o only ever replaces a regular file ----------------------------------------------------------------------

def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], list(folder.iterdir())


def test_output_through_a_symlink_keeps_the_link_and_writes_its_target(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "plan.json"
    link.symlink_to(target)
    write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    _no_temp_files(tmp_path)


@pytest.mark.parametrize("make", ["directory", "fifo", "symlink-to-fifo"])
def test_output_that_is_not_a_regular_file_is_refused(tmp_path, make):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = {"directory": tmp_path / "d", "fifo": fifo, "symlink-to-fifo": tmp_path / "link"}[make]
    if make == "directory":
        path.mkdir()
    elif make == "symlink-to-fifo":
        path.symlink_to(fifo)
    result = run(*PLAN_TINY, "-o", str(path))
    assert_user_error(result, str(path))
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # the FIFO is still a FIFO
    assert not path.is_file()
    _no_temp_files(tmp_path)


def test_output_to_a_device_is_refused_and_the_device_kept(tmp_path):
    # As root, `-o /dev/null` used to replace /dev/null with a regular file. The test uses its own null device
    # (a character device 1:3 made here) so that a regression cannot damage the machine's /dev/null.
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    result = run(*PLAN_TINY, "-o", str(device))
    assert_user_error(result, str(device), "not a regular file")
    assert stat.S_ISCHR(device.stat().st_mode)
    _no_temp_files(tmp_path)


def test_a_failed_write_leaves_no_temporary_file_and_the_old_content(tmp_path, monkeypatch):
    from paraplan.errors import OutputError

    target = tmp_path / "plan.json"
    target.write_text("old")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OutputError, match="No space left"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    _no_temp_files(tmp_path)


# --- 4. user errors: one message, exit 1, no traceback -------------------------------------------------------------

def test_binary_files_as_profile_or_plan_are_user_errors(tmp_path):
    blob = tmp_path / "blob.json"
    blob.write_bytes(bytes(range(256)) * 4)
    assert_user_error(run(*PLAN_TINY, "--profile", str(blob), "-o", str(tmp_path / "p.json")), "not UTF-8")
    assert_user_error(run("launch", str(blob), "--dry-run", "--run-dir", str(tmp_path / "r")), "not UTF-8")
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "r").exists()


def test_output_under_proc_is_a_user_error():
    assert_user_error(run(*PLAN_TINY, "-o", "/proc/paraplan-plan.json"), "/proc/paraplan-plan.json")


def test_top_zero_is_a_user_error(tmp_path):
    assert_user_error(run(*PLAN_TINY, "--top", "0", "-o", str(tmp_path / "p.json")), "--top")


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(make_plan().model_dump_json())
    (tmp_path / "file").write_text("x")
    assert_user_error(run("launch", str(plan), "--dry-run", "--run-dir", str(tmp_path / "file")), "is a file")


def test_full_stdout_is_one_line_on_stderr_and_exit_1(tmp_path):
    with open("/dev/full", "w") as full:
        result = paraplan("models", stdout=full)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "No space left" in result.stderr


def test_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "paraplan", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader went away, as with `paraplan models | head -0`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err and "Exception ignored" not in err


def test_profile_that_cannot_fit_is_refused_before_allocating(tmp_path, monkeypatch):
    import paraplan.profiler.layers as layers

    # llama3-8b's block in fp32 holds 218M parameters: weights and gradients alone are 1.6 GiB > 1 GiB free.
    monkeypatch.setattr(layers, "available_memory_bytes", lambda dev: 2.0**30)
    out = tmp_path / "p.json"
    result = run("profile", "llama3-8b", "--micro-batches", "1", "--no-links", "-o", str(out))
    assert_user_error(result, "needs at least", "GiB free")
    assert not out.exists()


def test_profile_memory_bound_is_weights_plus_gradients_at_least():
    from paraplan.profiler.layers import profile_memory_lower_bound
    from paraplan.models.presets import load_model_spec

    spec = load_model_spec("llama3-8b")
    need = profile_memory_lower_bound(spec, 1, 128, "fp32")
    # Hand count of one Llama-3-8B block: q, o 4096^2 each; k, v 4096 x 1024 each; MLP 3 x 4096 x 14336; 2 norms.
    block = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert need["block"] >= 2 * 4 * block
    assert need["block"] < 2 * 4 * block * 1.01  # the bound stays a bound, not a guess with a margin


# --- 6. inputs validated at the boundary ------------------------------------------------------------------------

@pytest.mark.parametrize("version", [99, None, "1", True])
def test_plan_of_another_schema_version_is_refused(tmp_path, version):
    data = json.loads(make_plan(dp=2).model_dump_json())
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(data))
    assert_user_error(run("launch", str(plan), "--dry-run", "--run-dir", str(tmp_path / "r")), "schema_version")
    assert not (tmp_path / "r").exists()


def test_hand_edited_grad_accum_is_refused(tmp_path):
    data = json.loads(make_plan(dp=2, micro_batch_size=2, global_batch=8).model_dump_json())
    data["strategy"]["grad_accum"] = 1  # 2 x 2 x 1 = 4 sequences, not the plan's global batch of 8
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(data))
    assert_user_error(run("launch", str(plan), "--dry-run", "--run-dir", str(tmp_path / "r")), "global_batch is 8")


def test_cpu_profile_is_refused_for_a_gpu_cluster(tmp_path, tiny_profile):
    result = run("plan", "llama-tiny", "--cluster", "8xH100-80GB", "--global-batch", "8", "--seq-len", "64",
                 "--dtype", "fp32", "--profile", str(tiny_profile), "-o", str(tmp_path / "p.json"))
    assert_user_error(result, "cpu", "8xH100-80GB", "do not transfer")


@pytest.mark.parametrize("command", ["plan", "estimate"])
def test_sequence_longer_than_the_model_positions_is_refused(tmp_path, command):
    args = ["llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "4096"]
    if command == "estimate":
        args += ["--tp", "1", "--pp", "1", "--dp", "2", "--micro-batch", "1"]
    else:
        args += ["-o", str(tmp_path / "p.json")]
    assert_user_error(run(command, *args), "2048")


@pytest.mark.parametrize("options,fragment", [
    (("--strategy", "dp=2,dp=1"), "twice"),
    (("--time-limit", "-1"), "--time-limit"),
    (("--time-limit", "0"), "--time-limit"),
])
def test_bad_options_are_refused(tmp_path, options, fragment):
    assert_user_error(run(*PLAN_TINY, *options, "-o", str(tmp_path / "p.json")), fragment)
    assert not (tmp_path / "p.json").exists()


# --- 8. messages that say which rule failed and what to change -----------------------------------------------------

def test_forced_strategy_names_the_rule_that_rejects_it(tmp_path):
    result = run(*PLAN_TINY, "--strategy", "offload=true", "-o", str(tmp_path / "p.json"))
    assert_user_error(result, "host memory on a CPU cluster")
    result = run("plan", "gpt3-175b", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                 "--strategy", "pp=2", "-o", str(tmp_path / "p.json"))
    assert_user_error(result, "tied embeddings")


def test_forced_zero3_is_not_suggested_again(tmp_path):
    result = run("plan", "llama3-70b", "--cluster", "2xH100-80GB", "--global-batch", "8", "--seq-len", "4096",
                 "--strategy", "zero=3", "-o", str(tmp_path / "p.json"))
    assert_user_error(result, "no plan fits")
    assert "zero=3" not in result.output


def test_cluster_file_naming_a_catalog_device_needs_no_link_fields(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes: 2\ndevices_per_node: 8\ndevice: H100-80GB\n")
    result = run("plan", "llama3-8b", "--cluster", str(cluster), "--global-batch", "64", "--seq-len", "4096",
                 "--json", "-o", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["cluster"]["inter_node_bandwidth_bytes_per_s"] == 50e9  # the catalog's DGX H100 node (8x NDR)


def test_default_run_directory_never_overwrites_an_earlier_run(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(make_plan(dp=2).model_dump_json())
    earlier = tmp_path / "runs" / "plan-torch"
    earlier.mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    result = paraplan("launch", str(plan), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (earlier / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / "runs" / "plan-torch-2" / "plan.json").exists()
    assert "runs/plan-torch-2" in result.stderr + result.stdout
    assert_user_error(run("launch", str(plan), "--dry-run", "--run-dir", str(earlier)), "earlier run")


def test_launch_summary_names_the_steps_it_averaged():
    from rich.console import Console

    from paraplan.cli.render import render_measured

    console = Console(record=True, width=200)
    rows = [{"step": i, "loss": 5.0, "step_time_s": 1.0, "peak_memory_bytes": [1, 1]} for i in (1, 2)]
    render_measured(console, make_plan(), rows)
    text = console.export_text()
    assert "steps 3+" not in text and "all 2 steps" in text


# --- 9. everyday polish ---------------------------------------------------------------------------------------------

def test_version_and_completion():
    assert run("--version").output.strip() == "paraplan 0.1.0"
    assert "--install-completion" in run("--help").output


def test_models_does_not_import_torch():
    code = ("import sys; from paraplan.cli.app import main; sys.argv = ['paraplan', 'models'];\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_strategy_help_lists_every_key():
    from paraplan.cli.app import STRATEGY_HELP, _STRATEGY_KEYS

    for key in _STRATEGY_KEYS:
        assert key in STRATEGY_HELP
    assert "offload" in run("plan", "--help").output


def test_readme_shell_blocks_have_no_inline_alternatives():
    """A `[--x a|b]` inside a bash block is a pipe to a shell: README blocks must run when pasted."""
    import re

    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        assert not re.search(r"\[--[^\]]*\|", block), block


def test_search_reports_progress_that_adds_up():
    from paraplan.catalog import load_cluster_spec
    from paraplan.models.presets import load_model_spec
    from paraplan.planner.search import search_plans
    from paraplan.types import TrainSpec

    seen = []
    plans = search_plans(load_model_spec("llama3-8b"), load_cluster_spec("8xH100-80GB"),
                         TrainSpec(global_batch=64, seq_len=4096), top_k=2, progress=seen.append)
    last = seen[-1]
    # Every candidate the rules allow is solved, pruned by a bound or found unable to fit, one report each.
    assert len(seen) == last.total == last.solved + last.pruned + last.cannot_fit
    assert last.solved == plans[0].solver.milps_solved
    assert last.best_step_time_s == pytest.approx(plans[0].predicted.step_time_s, rel=1e-6)
    assert [p.solved + p.pruned + p.cannot_fit for p in seen] == list(range(1, last.total + 1))
