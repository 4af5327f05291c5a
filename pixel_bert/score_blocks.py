"""A retrieval evaluation that survives being killed: the score matrix is written a block of image
rows at a time, so that a kill, a preemption or a failed node loses at most one block per rank, and
the same command run again scores only the blocks left (the protocols of Sec. 4.2 at the paper's
scale: docs/paper.md#evaluation-protocols, docs/retrieval.md).

A *segment* is a part of the matrix a protocol needs: image rows against caption columns. COCO 5K
(and Flickr30K 1K) is one segment, the whole matrix; the COCO 1K protocol is five, its diagonal fold
blocks. A *block* is ``images_per_block`` consecutive rows of one segment against all of that
segment's captions. Blocks are numbered over the split, not over the ranks, so a run with another
number of processes finds the same blocks and reuses them.

Each block is a file ``rows_<start>-<stop>.pt`` in a folder named by the protocol and a fingerprint
of everything the scores depend on: the model (weights, buffers and config), the split (image paths
and ids, caption ids and images), the caption tokens (captions, tokenizer, max_text_len) and the
protocol. The block's header repeats the fingerprint, and a block whose header differs (copied from
another run) or that cannot be read is never used: it is scored again, with a message. Blocks are
written atomically (`pixel_bert.files.save_torch`) and read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import sys
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .files import save_torch, write_json

BLOCK_FORMAT = 1
ABOUT_FILE = "about.json"  # the fingerprint's parts, so a folder of other blocks can say how it differs

# What a differing fingerprint part means, in the user's terms (the message for a folder not used).
PART_MEANING = {
    "model": "another model (other weights or config: another checkpoint)",
    "split": "other images or captions (another split, --max-images or --max-captions)",
    "text": "other caption tokens (another tokenizer or max_text_len)",
    "protocol": "another protocol (--protocol, --fold-size)",
}


class Segment(NamedTuple):
    """Image rows ``rows`` of the matrix against caption columns ``columns`` (indices of captions)."""
    rows: range
    columns: np.ndarray


class Block(NamedTuple):
    """Rows ``start:stop`` of segment ``segment`` against all of the segment's captions."""
    segment: int
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return f"rows_{self.start:06d}-{self.stop:06d}.pt"


def plan_blocks(segments: Sequence[Segment], images_per_block: int) -> List[Block]:
    """Every block of ``segments``, in row order (the same list whatever the number of ranks)."""
    return [Block(i, start, min(start + images_per_block, segment.rows.stop))
            for i, segment in enumerate(segments)
            for start in range(segment.rows.start, segment.rows.stop, images_per_block)]


def tensor_digest(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of tensors' names, dtypes, shapes and bytes: equal exactly when the tensors are."""
    h = hashlib.sha256()
    for name, tensor in named_tensors:
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_of(parts: Dict[str, str]) -> str:
    return json_digest({"format": BLOCK_FORMAT, **parts})


class BlockStore:
    """The finished score blocks of one evaluation under ``root``, in ``root/<protocol>_<fingerprint>/``.

    ``parts``: a digest per thing the scores depend on (keys of PART_MEANING); ``about``: what a
    person reads in the folder's about.json (the checkpoint, the sizes). Blocks that cannot be used
    are reported on stderr by the rank that finds them (``warn``)."""

    def __init__(self, root: str, protocol: str, parts: Dict[str, str], about: Dict[str, Any], warn=None):
        self.parts, self.about = dict(parts), dict(about)
        self.fingerprint = fingerprint_of(self.parts)
        self.folder = os.path.join(root, f"{protocol}_{self.fingerprint[:16]}")
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))

    def path(self, block: Block) -> str:
        return os.path.join(self.folder, block.file_name)

    def describe(self) -> None:
        """Write about.json (rank 0, before scoring), which `other_folders` of later runs read."""
        write_json(os.path.join(self.folder, ABOUT_FILE),
                   {"fingerprint": self.fingerprint, "parts": self.parts, "about": self.about})

    def other_folders(self) -> List[str]:
        """A line for each folder of blocks beside this one (same root): what it was written for."""
        root = os.path.dirname(self.folder)
        lines = []
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            folder = os.path.join(root, name)
            if folder == self.folder or not os.path.isdir(folder):
                continue
            parts = _read_about(os.path.join(folder, ABOUT_FILE)).get("parts", {})
            differs = [meaning for key, meaning in PART_MEANING.items() if parts.get(key) != self.parts.get(key)]
            lines.append(f"score blocks in {folder} are for {' and '.join(differs) or 'an unknown run'}: not "
                         "used by this run (delete the folder once its run is no longer needed)")
        return lines

    def load(self, block: Block, n_columns: int) -> Optional[np.ndarray]:
        """The block's scores (rows, n_columns) when a usable file holds them, else None."""
        path = self.path(block)
        if not os.path.isfile(path):
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            self.warn(f"score block {path} cannot be read ({e}); scoring it again")
            return None
        if not isinstance(saved, dict) or saved.get("format") != BLOCK_FORMAT \
                or saved.get("fingerprint") != self.fingerprint:
            self.warn(f"score block {path} was written for another checkpoint, split or text settings (its "
                      f"header's fingerprint is not this run's {self.fingerprint[:16]}): not used; scoring it again")
            return None
        scores = saved.get("scores")
        shape = (block.stop - block.start, n_columns)
        if saved.get("rows") != [block.start, block.stop] or not torch.is_tensor(scores) \
                or tuple(scores.shape) != shape or scores.dtype != torch.float32:
            self.warn(f"score block {path} does not hold rows {block.start}-{block.stop} x {n_columns} captions "
                      "as float32: not used; scoring it again")
            return None
        return scores.numpy()

    def remove_interrupted_write(self, block: Block) -> None:
        """Delete what a kill left of an earlier write of ``block`` (`files.atomic_write`'s temporary
        file); only the rank that scores the block calls this, so no other write is touched."""
        for stale in glob.glob(os.path.join(self.folder, f".{block.file_name}.*.tmp")):
            os.remove(stale)

    def save(self, block: Block, scores: np.ndarray) -> str:
        return save_torch({"format": BLOCK_FORMAT, "fingerprint": self.fingerprint, "rows": [block.start, block.stop],
                           "scores": torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))},
                          self.path(block))


def _read_about(path: str) -> Dict[str, Any]:
    """A folder's about.json, or {} when it has none that can be read (then it matches nothing)."""
    try:
        with open(path, encoding="utf-8") as f:
            about = json.load(f)
    except (OSError, ValueError):
        return {}
    return about if isinstance(about, dict) else {}
