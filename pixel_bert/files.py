"""Writing files so that a crash, a kill or a full disk never leaves half a file behind.

Every writer in pixel-bert (checkpoints, model.pt, vocab.txt, answers, predictions, score
matrices, feature caches, config and result JSON) goes through `atomic_write`: the bytes go to a
temporary file in the same folder, are flushed and fsync'ed, and only then renamed over the
target. A reader sees the old file or the new one, never a mixture; on any error the temporary
file is removed and the old file is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Iterator, Optional


class DiskFullError(OSError):
    """The disk filled up while writing; the message names the file and its folder."""


class UnwritableError(PermissionError):
    """The folder (or the file) may not be written; the message names the file and its folder."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[Any]:
    """``with atomic_write(path, "w", encoding="utf-8") as f: f.write(...)`` (see the module docstring).
    Each process writes its own temporary file, so ranks racing to write the same file are safe.
    A full disk raises `DiskFullError`, a folder without write permission (or a read-only file
    system) `UnwritableError`, both naming the file and the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):  # already gone, or the folder refuses even this
                os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path} (folder {folder}); "
                                "the previous version of the file is intact. Free space there or choose "
                                "another output folder, then resume") from e
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UnwritableError(e.errno, f"cannot write {path}: {e.strerror} (folder {folder}); the previous "
                                  "version of the file is intact. Make the folder writable or choose another "
                                  "output folder, then resume") from e
        raise


def make_output_folder(path: str, flag: str = "--output-dir") -> str:
    """Create a run's output folder, or raise `UnwritableError` naming it and ``flag`` when it cannot
    be created (a parent is a file, no permission) or is not writable: before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UnwritableError(e.errno, f"cannot create the output folder {path} ({e.strerror}); choose another "
                              f"{flag}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise UnwritableError(errno.EACCES, f"the output folder {path} is not writable; make it writable or "
                              f"choose another {flag}")
    return path


def save_torch(obj: Any, path: str) -> str:
    """torch.save through `atomic_write` (read back with ``torch.load(..., weights_only=True)``)."""
    import torch
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def write_json(path: str, obj: Any, indent: Optional[int] = 2) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=str, ensure_ascii=False)
        f.write("\n")
    return path


def write_text(path: str, text: str) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
