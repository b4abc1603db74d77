"""Errors raised by paraplan. Each message says what to change; the CLI prints it and exits 1."""

from __future__ import annotations

from pydantic import ValidationError


class ParaplanError(Exception):
    """Base class of every error a user can fix by changing the input."""


class ModelSpecError(ParaplanError):
    """Unknown preset, unreadable model file, or a factory that does not return a usable module."""


class ClusterSpecError(ParaplanError):
    """Unknown cluster preset or device, or a malformed cluster file."""


class TrainSpecError(ParaplanError):
    """Training setup that cannot be satisfied (for example a global batch not divisible by dp x micro-batch)."""


class StrategyError(ParaplanError):
    """A forced or planned strategy that is invalid for the model or the cluster."""


class NoFeasiblePlanError(ParaplanError):
    """No strategy fits in device memory."""


class ProfileError(ParaplanError):
    """A profile that cannot be used (missing micro-batch sizes, other model, unreadable file)."""


class OutputError(ParaplanError):
    """An output path paraplan may not or cannot write (a directory, a device, a symlink to one, no space)."""


class LaunchError(ParaplanError):
    """A plan that cannot be launched here (world-size mismatch, missing backend, failed job)."""


class CheckpointError(LaunchError):
    """A checkpoint that cannot be written, read or resumed from (damaged, or of another model, backend or layout)."""


class LaunchInterrupted(LaunchError):
    """The launcher got SIGINT or SIGTERM and stopped the job; the CLI exits with ``exit_code`` (128 + signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def format_validation_error(what: str, exc: ValidationError) -> str:
    """Render pydantic errors as a short list: ``what is invalid:\\n  - field: message``."""
    lines = [f"{what} is invalid:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        line = f"  - {loc}: {err['msg']}"
        if line not in lines:  # a union or a repeated validator reports the same problem more than once
            lines.append(line)
    return "\n".join(lines)
