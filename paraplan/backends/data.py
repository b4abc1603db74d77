"""Byte-level text data for the built-in trainer.

Tokens are raw bytes (0..255), so any model with ``vocab >= 256`` trains on any text without a tokenizer. Sample
``i`` of the run is the window starting at ``offsets[i]``, where ``offsets`` is a seeded permutation of window starts:
every strategy (dp, tp, pp, ZeRO) sees the same global batch at the same step, so losses can be compared across
strategies.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from paraplan.errors import LaunchError

MAX_BYTES = 8 * 1024 * 1024


def default_data_paths() -> list[Path]:
    """The Python standard library's own ``.py`` files on this machine (always present, real text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


def resolve_data_paths(data: list[str] | None) -> list[Path]:
    """Expand ``--data`` arguments (files or directories, searched recursively for files) into files.

    Raises:
        LaunchError: a path that does not exist, or no files at all.
    """
    if not data:
        return default_data_paths()
    files: list[Path] = []
    for item in data:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise LaunchError(f"--data {item}: no such file or directory")
    if not files:
        raise LaunchError(f"--data {' '.join(data)}: no files found")
    return files


def min_corpus_bytes(seq_len: int) -> int:
    """Fewest bytes ``ByteDataset`` accepts: a window is ``seq_len + 1`` bytes (the tokens and, shifted by one,
    their next-token targets) and it draws window starts from ``len - seq_len - 1`` offsets, which must be >= 1."""
    return seq_len + 2


def corpus_bytes(paths: list[Path], max_bytes: int = MAX_BYTES) -> int:
    """Bytes ``ByteDataset`` will read from ``paths``: their sizes summed, capped at ``max_bytes`` as it caps them."""
    total = 0
    for path in paths:
        total += Path(path).stat().st_size
        if total >= max_bytes:
            return max_bytes
    return total


def check_corpus(paths: list[Path], seq_len: int, max_bytes: int = MAX_BYTES) -> None:
    """Refuse, before any training process starts, a corpus ``ByteDataset`` would refuse in every rank.

    Args:
        paths: the files of ``--data`` (see :func:`resolve_data_paths`).
        seq_len: tokens (bytes) per sequence.
        max_bytes: the cap ``ByteDataset`` reads up to.

    Raises:
        LaunchError: fewer than :func:`min_corpus_bytes` bytes in all files together.
    """
    have, need = corpus_bytes(paths, max_bytes), min_corpus_bytes(seq_len)
    if have < need:
        raise LaunchError(_too_small(have, need, seq_len, paths))


def _too_small(have: int, need: int, seq_len: int, paths: list[Path]) -> str:
    names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return (
        f"--data ({names}) holds {have} bytes; training at seq_len {seq_len} needs at least {need} "
        f"(seq_len + 2: one sequence and its next-token targets). Give more text or re-plan with a shorter --seq-len"
    )


class ByteDataset:
    """Fixed-length windows of bytes; ``batch(start, n)`` -> ``(tokens, targets)`` each ``(n, seq_len)`` int64."""

    def __init__(self, paths: list[Path], seq_len: int, seed: int = 0, max_bytes: int = MAX_BYTES) -> None:
        chunks: list[bytes] = []
        total = 0
        for path in paths:
            data = Path(path).read_bytes()[: max_bytes - total]
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        raw = b"".join(chunks)
        if len(raw) < min_corpus_bytes(seq_len):
            raise LaunchError(_too_small(len(raw), min_corpus_bytes(seq_len), seq_len, list(paths)))
        self.data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # uint8 keeps the resident set small
        self.seq_len = seq_len
        n_windows = len(raw) - seq_len - 1
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randperm(n_windows, generator=gen, dtype=torch.int32)

    def batch(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+n-1`` of the run (wrapping around the data)."""
        idx = torch.arange(start, start + n) % len(self.offsets)
        starts = self.offsets[idx]
        pos = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]  # int32 + int64 -> int64 indices
        window = self.data[pos].long()
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def sample_start(step: int, global_batch: int, dp_rank: int, dp: int, micro_index: int, micro_batch: int) -> int:
    """Index of the first sample of micro-batch ``micro_index`` of data-parallel rank ``dp_rank`` at ``step``.

    The global batch of step k is samples ``[k B, (k+1) B)``; rank r takes the contiguous slice of ``B / dp``.
    """
    per_rank = global_batch // dp
    return step * global_batch + dp_rank * per_rank + micro_index * micro_batch
