"""Reading user files and writing output files safely.

Reading: every file is read as UTF-8 text with a size cap, so a binary file, a directory, a FIFO or a huge file
gives a clear error instead of a traceback or a hang. Files paraplan wrote carry ``schema_version``, which must be
the one this version writes.

Writing: :func:`write_atomic` writes to a unique temporary file beside the target and renames it over the target,
and only when the target is a regular file or does not exist yet (a symlink is followed to such a target, never
replaced). Directories, devices, FIFOs and sockets are refused; the temporary file is removed on any failure.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

import yaml

from paraplan.errors import OutputError, ParaplanError, format_validation_error

M = TypeVar("M", bound=BaseModel)

MAPPING_SUFFIXES = {".json", ".yaml", ".yml"}
MAX_INPUT_BYTES = 64 * 1024 * 1024  # no model, cluster, profile or plan file comes near this


def read_text(path: Path, what: str, error: type[ParaplanError], hint: str = "") -> str:
    """The UTF-8 text of a regular file of at most ``MAX_INPUT_BYTES``.

    Args:
        path: the file.
        what: how to name it in messages, e.g. "cluster file".
        error: the ParaplanError subclass to raise.
        hint: appended to the "does not exist" message (e.g. "run `paraplan profile` first").

    Raises:
        error: missing, not a regular file (a directory, device or FIFO), too large, unreadable, or not UTF-8 text.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist" + (f"; {hint}" if hint else "")) from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a directory; give the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if st.st_size > MAX_INPUT_BYTES:
        raise error(f"{what} {path} is {st.st_size} bytes; a {what} is a small text file (under "
                    f"{MAX_INPUT_BYTES // 2**20} MiB). Is this the right file?")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text (a binary file?); give the JSON/YAML file paraplan "
                    "reads") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_mapping(path: Path, what: str, error: type[ParaplanError]) -> dict:
    """Read a YAML or JSON file that must hold a mapping.

    Args:
        path: the file (``.json``, ``.yaml`` or ``.yml``).
        what: how to name it in messages, e.g. "cluster file".
        error: the ParaplanError subclass to raise.

    Raises:
        error: the file is missing, unreadable, not valid YAML/JSON, or not a mapping.
    """
    text = read_text(path, what, error)
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"cannot parse {what} {path}: {first}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of fields")
    return data


def read_model(path: Path, model: type[M], what: str, error: type[ParaplanError], hint: str) -> M:
    """Read a JSON file paraplan wrote (profile, plan) back into its pydantic model.

    The file must carry the ``schema_version`` this version writes (``types.SCHEMA_VERSION``); older or newer
    files are refused rather than read with a guess.

    Raises:
        error: the file is missing (the message ends with ``hint``), not JSON, of another schema version, or
            fails validation (errors listed).
    """
    from paraplan.types import SCHEMA_VERSION

    text = read_text(path, what, error, hint)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise error(f"{what} {path} is not JSON ({exc}); {hint}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a JSON object; {hint}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        found = "has no schema_version" if "schema_version" not in data else f"has schema_version {version!r}"
        raise error(f"{what} {path} {found}; this paraplan reads schema_version {SCHEMA_VERSION}. Re-create it "
                    f"with this version ({hint})")
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise error(format_validation_error(f"{what} {path}", exc)) from exc


def check_output_path(path: Path, what: str = "output") -> Path:
    """The regular file ``write_atomic`` will replace for ``path`` (a symlink resolved to its target).

    Call it before long work, so a bad ``-o`` is refused before anything runs.

    Raises:
        OutputError: ``path`` (or what a symlink points to) is a directory, a device, a FIFO or a socket.
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        st = target.stat()
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {path} is a directory; give a file name, e.g. {path / 'plan.json'}")
    if not stat.S_ISREG(st.st_mode):
        via = f" (a symlink to {target})" if target != path else ""
        raise OutputError(f"{what} {path}{via} is not a regular file (a device, FIFO or socket); paraplan only "
                          "replaces regular files. Give a file path")
    return target


def write_atomic(path: Path, text: str, what: str = "output") -> None:
    """Write ``text`` so that ``path`` holds either its old content or all of ``text``, never a part.

    The text goes to a unique temporary file in the target's directory, is flushed to disk, and is renamed over
    the target. A symlink is kept and its target replaced.

    Raises:
        OutputError: the path is refused by :func:`check_output_path`, or the write fails (no space, no
            permission, a read-only or virtual file system such as /proc); no temporary file is left behind.
    """
    target = check_output_path(path, what)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = target.stat().st_mode & 0o777 if target.exists() else None
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
