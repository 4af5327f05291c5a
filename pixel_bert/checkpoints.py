"""Training checkpoints and the run folder: finding the newest readable checkpoint, clearing
interrupted writes, setting an earlier run aside, and every random stream of a process (exact resume).

A checkpoint (`pixel_bert.trainer.Trainer.state_dict`) holds plain data only, so it loads with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import datetime
import glob
import os
import random
import re
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .config import TrainConfig
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
        raise ValueError(f"{path}: not a training checkpoint (no {', '.join(missing)}). --resume takes a "
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
