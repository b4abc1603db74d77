"""``paraplan launch --calibrate``: trial steps of the top-k plans, a calibration fitted on them, and a re-plan.

The plan file carries what a new search needs (model, cluster, training setup, the profile's path); the search is
re-run for the ``k`` best plans (no strategy forced: a plan does not record the ``--strategy`` it was made with),
each is launched for a few steps with per-phase times into ``<run_dir>/trials/<i>``, the calibration
(``paraplan.cost_models.calibration``) is fitted on all of them and written to ``<run_dir>/calibration.json``, and
the search is run again on the calibrated inputs. When the calibrated best plan uses a mechanism no trial exercised
(tensor parallelism, ZeRO-3: their overheads are fitted only from runs that have them,
``calibration.uncovered_mechanisms``), that plan is tried too and the calibration re-fitted, up to
:data:`MAX_EXTRA_TRIALS` times, so the plan launched is never picked on an overhead nobody measured. What the caller
then launches is the calibrated best plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from paraplan.backends.launch import launch_plan
from paraplan.cost_models.calibration import (
    Calibration, apply_calibration, calibrated_plan, fit_calibration, read_run, uncovered_mechanisms,
    write_calibration,
)
from paraplan.errors import LaunchError
from paraplan.files import read_model, write_atomic
from paraplan.planner.search import search_plans
from paraplan.types import ModelProfile, Plan

TRIALS_DIR = "trials"
CALIBRATION_FILE = "calibration.json"
MAX_EXTRA_TRIALS = 2


@dataclass(frozen=True)
class TrialResult:
    """The calibration fitted on the trial runs and the plan searched with it."""

    calibration: Calibration
    plan: Plan
    trial_dirs: list[Path]


def calibrate_by_trial(plan: Plan, backend: str, run_dir: Path, top_k: int = 2, steps: int = 6,
                       data: list[str] | None = None, quiet: bool = True) -> TrialResult:
    """Launch ``top_k`` plans for ``steps`` steps each, calibrate on them and re-plan (module docstring).

    Args:
        plan: a plan priced with a profile (``plan --profile``), for this machine's cluster.
        backend: deepspeed or torch: the trials run on it and the calibration is for it.
        run_dir: the run directory; trials go to ``run_dir/trials/<i>``, the calibration to
            ``run_dir/calibration.json``.
        top_k: plans to try (>= 1; two different strategies separate the coefficients better than one).
        steps: steps per trial (>= 3: the first two are warm-up and left out of the measured mean).

    Raises:
        LaunchError: a plan without a readable profile, too few steps, or a failed trial.
        CalibrationError: the fit's inputs are unusable.
    """
    if steps < 3:
        raise LaunchError(f"--calibrate-steps {steps}: use 3 or more (the first two steps are warm-up)")
    if plan.predicted.compute_source != "profile" or not plan.profile_path:
        raise LaunchError("launch --calibrate scales a profile's layer times: make the plan with --profile")
    profile = read_model(Path(plan.profile_path), ModelProfile, "profile", LaunchError,
                         "re-run `paraplan profile` and plan with it")
    trials = search_plans(plan.model, plan.cluster, plan.train, profile, top_k=top_k, backend=backend,  # type: ignore
                          profile_path=plan.profile_path)
    dirs: list[Path] = []

    def trial_run(trial: Plan) -> None:
        d = run_dir / TRIALS_DIR / str(len(dirs))
        launch_plan(trial, backend, d, steps=steps, data=data, quiet=quiet, phase_times=True)  # type: ignore
        dirs.append(d)

    for trial in trials:
        trial_run(trial)
    for extra in range(MAX_EXTRA_TRIALS + 1):
        cal = fit_calibration([read_run(d) for d in dirs])
        cluster, cal_profile = apply_calibration(cal, plan.cluster, profile)
        best = search_plans(plan.model, cluster, plan.train, cal_profile, top_k=1, backend=backend,  # type: ignore
                            profile_path=plan.profile_path)[0]
        if extra == MAX_EXTRA_TRIALS or not uncovered_mechanisms(cal, best):
            break
        # The pick rests on an overhead no trial measured: measure it (on the cluster as it is, like the others).
        trial_run(best.model_copy(update={"cluster": plan.cluster}))
    write_calibration(cal, run_dir / CALIBRATION_FILE)
    best = calibrated_plan(cal, best, plan.cluster.device.memory_bytes)
    write_atomic(run_dir / "plan.calibrated.json", best.model_dump_json(indent=2))
    return TrialResult(cal, best, dirs)
