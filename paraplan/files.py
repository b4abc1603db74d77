"""Reading user files and writing output files safely."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

import yaml

from paraplan.errors import ParaplanError, format_validation_error

M = TypeVar("M", bound=BaseModel)

MAPPING_SUFFIXES = {".json", ".yaml", ".yml"}


def read_mapping(path: Path, what: str, error: type[ParaplanError]) -> dict:
    """Read a YAML or JSON file that must hold a mapping.

    Args:
        path: the file (``.json``, ``.yaml`` or ``.yml``).
        what: how to name it in messages, e.g. "cluster file".
        error: the ParaplanError subclass to raise.

    Raises:
        error: the file is missing, unreadable, not valid YAML/JSON, or not a mapping.
    """
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of fields")
    return data


def read_model(path: Path, model: type[M], what: str, error: type[ParaplanError], hint: str) -> M:
    """Read a JSON file paraplan wrote (profile, plan) back into its pydantic model.

    Raises:
        error: the file is missing (the message ends with ``hint``) or fails validation (errors listed).
    """
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {hint}")
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise error(format_validation_error(f"{what} {path}", exc)) from exc


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename, so no half-written file is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
