"""Writing files so that a crash, a kill or a full disk never leaves half a file behind.

Every writer in pixel-bert (checkpoints, model.pt, vocab.txt, answers, predictions, score
matrices, feature caches, config and result JSON) goes through `atomic_write`: the bytes go to a
temporary file in the same folder, are flushed and fsync'ed, and only then renamed over the
target. A reader sees the old file or the new one, never a mixture; on any error the temporary
file is removed and the old file is left as it was.

A folder of files that belong together (a model folder: config.json, model.safetensors, vocab.txt)
is written with `atomic_folder`: into a temporary sibling folder, renamed into place once every
file is complete, so the folder appears whole or not at all.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import torch

from .errors import UserError


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class DiskFullError(OSError, UserError):
    """The disk filled up while writing; the message names the file and its folder."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class UnwritableError(PermissionError, UserError):
    """The folder (or the file) may not be written; the message names the file and its folder."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the mode open() would give them
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
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def write_bytes(path: str, data: bytes) -> str:
    with atomic_write(path) as f:
        f.write(data)
    return path


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """``with atomic_folder("RUN/model") as tmp: write files into tmp``: when the block ends without
    an error, ``tmp`` is renamed to ``path`` (an old folder there is replaced); on an error it is
    removed and the old folder is left as it was. A crash can leave the old folder renamed aside
    (``.NAME.*.old``) and ``path`` absent, never a ``path`` that holds only some of the files."""
    path = os.path.abspath(path)
    parent, name = os.path.dirname(path), os.path.basename(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder; choose another output folder")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a shared model folder must be readable by others
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(path):  # rename() cannot replace a non-empty folder: move the old one aside
        old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".old")
        os.replace(path, old)  # onto the empty folder mkdtemp just reserved for it
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(parent)
    if old is not None:
        shutil.rmtree(old)


def _fsync_folder(path: str) -> None:
    """Make a rename inside ``path`` durable (a folder's entries are flushed like a file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Any, indent: Optional[int] = 2) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, default=str, ensure_ascii=False)
        f.write("\n")
    return path


def write_text(path: str, text: str) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
