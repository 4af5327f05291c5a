"""Training checkpoints and the run folder: finding the newest readable checkpoint, clearing
interrupted writes, setting an earlier run aside, every random stream of a process (exact resume),
and the lock that gives a run folder to one run at a time (`RunLock`).

A checkpoint (`pixel_bert.trainer.Trainer.state_dict`) holds plain data only, so it loads with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import random
import re
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .config import TrainConfig
from .errors import RunFolderError, UserError
from .tensor_files import load_weights_only

CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt$")


CKPT_KEYS = ("model", "optimizers", "schedulers", "scaler", "step", "epoch", "batch_in_epoch", "rng")


def list_checkpoints(out_dir: str) -> List[str]:
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if CKPT_PATTERN.search(p)]
    return sorted(paths, key=lambda p: int(CKPT_PATTERN.search(p).group(1)))


def read_training_checkpoint(path: str) -> dict:
    """The contents of a training checkpoint (a ``ckpt_*.pt`` of a run folder), read with
    ``weights_only=True``; a missing, damaged, foreign or code-carrying file raises an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    ckpt = load_weights_only(path, "checkpoint")
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a training checkpoint (no {', '.join(missing)}). --resume takes a "
                         f"ckpt_*.pt of a run folder; to start from a model.pt's weights use --init")
    return ckpt


def newest_valid_checkpoint(out_dir: str) -> Optional[Tuple[str, dict]]:
    """(path, contents) of the newest checkpoint that loads and holds a training state; a damaged
    or foreign file is reported and passed over."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, read_training_checkpoint(path)
        except ValueError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    return None


def remove_interrupted_checkpoint_writes(out_dir: str) -> List[str]:
    """Delete the temporary files of checkpoint writes that a kill interrupted (`files.atomic_write`
    names them ``.ckpt_<step>.pt.<random>.tmp``): never a checkpoint, but as large as one."""
    stale = glob.glob(os.path.join(out_dir, ".ckpt_*.pt.*.tmp"))
    for path in stale:
        os.remove(path)
    return stale


PREVIOUS_RUN_OUTPUTS = ("metrics.jsonl", "tensorboard", "model.pt", "model", "result.json")


def set_aside_previous_run(out_dir: str) -> Optional[str]:
    """A fresh start (``--resume none``) in a folder that holds an earlier run: move that run's
    checkpoints, metrics and final weights into ``out_dir/previous-<time>/``. Left in place, its
    higher-step checkpoints would be resumed later in place of this run's, this run's checkpoints would
    be pruned first as the oldest, and both runs' steps would mix in metrics.jsonl. Returns the folder,
    or None when there was no earlier run."""
    earlier = list_checkpoints(out_dir) + [p for p in (os.path.join(out_dir, name) for name in PREVIOUS_RUN_OUTPUTS)
                                           if os.path.exists(p)]
    if not earlier:
        return None
    dest = os.path.join(out_dir, datetime.datetime.now().strftime("previous-%Y%m%d-%H%M%S"))
    while os.path.exists(dest):  # two fresh starts within a second
        dest += "-1"
    os.makedirs(dest)
    for path in earlier:
        os.replace(path, os.path.join(dest, os.path.basename(path)))
    return dest


def rng_state() -> dict:
    """Every random stream of this process, as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """weights_only loading returns tuples as lists in places; random/numpy want tuples back."""
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def batch_layout(cfg: TrainConfig, world_size: int) -> Dict[str, int]:
    """What fixes the epoch length and the schedule: a run resumes only with the same layout."""
    return {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps, "world_size": world_size}


PLAIN_TYPES = (str, int, float, bool, type(None))


def check_plain_data(value: Any, where: str = "run_config") -> Any:
    """``value`` itself, when it is plain data (dicts with str keys, lists, tuples, str, numbers, bool,
    None): what a checkpoint may hold besides tensors, so that it loads with ``weights_only=True``.
    Anything else raises TypeError naming where it sits, before the first checkpoint is written."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not a string")
            check_plain_data(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(value).__name__} ({value!r:.60}): a checkpoint holds plain data only")
    return value


# -------------------------------------------------------------------------------------------------
#                                 One run per run folder
# -------------------------------------------------------------------------------------------------

LOCK_FILE = "run.lock"
LOCK_HEARTBEAT_SECONDS = 10.0   # how often the holder touches its lock file
LOCK_STALE_SECONDS = 60.0       # a lock untouched this long belongs to a run that is gone


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """A run holds its folder for its lifetime: a second run in the same folder is refused, naming the
    host, process id and start time of the first. The lock is a file created exclusively
    (``O_CREAT | O_EXCL``, which network file systems honour where ``flock`` may not) and touched by
    the holder every ``heartbeat`` seconds, so that it also works across the nodes of a cluster: a
    lock left by a process that died on this host is taken over at once, one whose heartbeat stopped
    (a dead node) after ``stale_after`` seconds, each with a message."""

    def __init__(self, folder: str, heartbeat: float = LOCK_HEARTBEAT_SECONDS,
                 stale_after: float = LOCK_STALE_SECONDS):
        self.path = os.path.join(folder, LOCK_FILE)
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def holder(self) -> Tuple[Optional[dict], float]:
        """(the lock file's contents or None when unreadable, seconds since its last heartbeat)."""
        age = time.time() - os.stat(self.path).st_mtime
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f), age
        except (OSError, ValueError):
            return None, age

    def why_stale(self, holder: Optional[dict], age: float) -> Optional[str]:
        """Why the lock's holder is gone (None while it may be running)."""
        if holder and holder.get("host") == self.me["host"] and not _process_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        if age > self.stale_after:
            return f"its last heartbeat was {age:.0f} s ago (more than {self.stale_after:.0f} s)"
        return None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a message when a stale lock was taken over, raises RunFolderError when
        another run holds it."""
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder, age = self.holder()
                except FileNotFoundError:  # released meanwhile
                    continue
                if holder is None and age < self.heartbeat:  # being written this very moment
                    time.sleep(0.2)
                    continue
                stale = self.why_stale(holder, age)
                if stale is None:
                    raise RunFolderError(
                        f"{os.path.dirname(self.path)} is in use by another run: host {holder.get('host')}, process "
                        f"{holder.get('pid')}, started {holder.get('started')} ({holder.get('command', '')}). Wait for "
                        f"it to end or give this run another --output-dir. A run that died leaves its lock stale "
                        f"{self.stale_after:.0f} s after its last heartbeat; {self.path} can also be deleted by hand")
                aside = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.replace(self.path, aside)  # only one of several runs taking it over wins the rename
                except FileNotFoundError:
                    continue
                os.remove(aside)
                note = (f"took over the lock of the run started {(holder or {}).get('started', '?')} on host "
                        f"{(holder or {}).get('host', '?')} (process {(holder or {}).get('pid', '?')}): {stale}")
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return note
        raise RunFolderError(f"{self.path}: could not take the run folder's lock (other runs keep taking it)")

    def _beat(self):
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:  # deleted by hand, or the folder is gone: nothing left to keep alive
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder, _ = self.holder()
        except FileNotFoundError:
            return
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            os.remove(self.path)
