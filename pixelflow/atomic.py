"""Atomic file writes: a reader of the target sees the previous complete file or the new complete one, never a part.

A process killed in the middle of a write (SIGKILL, pre-emption, the OOM killer, a full disk) leaves whatever
bytes it had written. Every writer here therefore writes a temporary file in the target's directory (a rename
is atomic only within one filesystem), flushes and fsyncs it, renames it over the target with
:func:`os.replace`, and on POSIX fsyncs the directory so the rename itself survives a power loss.

The temporary's name, ``.<target name>.<random>.partial``, matches no reader's pattern for the target: it
starts with a dot (the target's own prefix never matches it; ``glob.glob``'s ``*`` skips it) and ends in
``.partial``, not the target's extension (``pathlib``'s ``*.npz`` matches hidden names too, so the ending
matters). A killed writer leaves such a file behind; readers never see it, and a later write of the same
target does not depend on it.

A write that runs out of space (ENOSPC, or EDQUOT on a quota) removes its temporary, leaves the previous
target untouched and raises :class:`DiskFullError`, naming the file and its directory.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["PARTIAL_SUFFIX", "DiskFullError", "partial_path", "atomic_write", "atomic_write_bytes", "atomic_save_figure",
           "atomic_write_text", "atomic_save_npz", "atomic_torch_save", "append_line_atomic"]

PARTIAL_SUFFIX = ".partial"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write ran out of disk space (or quota); the target still holds its previous content, if any."""

    def __init__(self, path: Path):
        directory = path.parent.resolve()
        try:
            free = f"{shutil.disk_usage(directory).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        super().__init__(errno.ENOSPC, f"disk full (or quota exceeded) while writing {path} in {directory} ({free}): "
                                       "the previous file is intact; free space there or write to another disk")
        self.filename = str(path)


def partial_path(path: str | os.PathLike) -> Path:
    """A fresh name for the temporary of a write to ``path``: hidden, in the same directory, ending ``.partial``."""
    target = Path(path)
    if target.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(f"{target}: a target may not end in {PARTIAL_SUFFIX!r}, the ending of unfinished writes")
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def _create_partial(target: Path) -> tuple[int, Path]:
    """Open a new temporary exclusively; mode 0o666 less the umask, as ``open(path, "w")`` would create it."""
    for _ in range(100):
        partial = partial_path(target)
        try:
            return os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), partial
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a fresh temporary next to {target}")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; Windows has no directory handles to fsync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Write ``path`` through the yielded file object (``mode`` "wb" or "w"); it replaces ``path`` only when the
    block ends without an exception. The directory must exist."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w' (the file is replaced, never appended to), got {mode!r}")
    target = Path(path)
    fd, partial = _create_partial(target)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            raise DiskFullError(target) from error
        raise
    _fsync_directory(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_write(path, "w", encoding) as f:
        f.write(text)


def atomic_save_npz(path: str | os.PathLike, /, **arrays: Any) -> None:
    """``np.savez`` to exactly ``path`` (numpy would append ``.npz`` to a name without it; this does not)."""
    import numpy as np  # here, so that importing this module stays cheap for writers that need no numpy

    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def atomic_save_figure(figure: Any, path: str | os.PathLike, dpi: int = 120) -> None:
    """A matplotlib figure's PNG to exactly ``path``, atomically (``savefig`` itself writes in place)."""
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=dpi)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch  # here, so that importing this module stays cheap for writers that need no torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def append_line_atomic(path: str | os.PathLike, line: str, encoding: str = "utf-8") -> None:
    """Append one line (no newline inside; one is added) to a line-per-record file such as ``metrics.jsonl``.

    The file is rewritten whole and renamed over the old one, so a kill leaves it with or without the new
    line, never with half of it; meant for small logs with one writer (one process appends at a time)."""
    if "\n" in line or "\r" in line:
        raise ValueError(f"append_line_atomic appends one line; this one contains a line break: {line[:80]!r}")
    target = Path(path)
    try:
        old = target.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        raise ValueError(f"{target} does not end with a newline (written by something else, or cut short): "
                         "repair or move it away before appending")
    with atomic_write(target, "wb") as f:
        f.write(old)
        f.write(line.encode(encoding) + b"\n")
