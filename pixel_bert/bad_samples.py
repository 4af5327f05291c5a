"""Bad samples: a missing or broken image (or an empty caption) among millions must not stop a run,
nor be silently trained around when a whole image folder is wrong.

Bad samples across DataLoader workers
-------------------------------------
Datasets run inside DataLoader worker processes, each with its own memory, so nothing a dataset
counts or remembers there reaches the training loop, and a warning printed there would repeat in
every worker and every epoch. A bad sample therefore travels *in the batch*: the dataset returns a
`BadSample`, the collator (`drop_bad_samples`, also in the worker) drops it and puts
``batch["num_bad"]`` and ``batch["bad_samples"]`` into the batch, and the process that reads the
batches (`pixel_bert.trainer.Trainer`, `pixel_bert.downstream.predict_sharded`) hands them to one
`BadSampleReporter`, which warns once per file for the whole run and counts every occurrence. The
Trainer sums ``num_bad`` over the epoch (under DDP all-reduced) for its summary line, and stops the
run when too large a share of an epoch is bad, naming the first bad files.
"""
from __future__ import annotations

import collections
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, NamedTuple, Sequence, Set, Tuple

from .errors import UserError
from .images import ImageLoadError


class BadSampleWarning(UserWarning):
    """A sample was skipped (missing/corrupt image, empty caption). Filter it with `warnings`."""


class BadSampleError(UserError):
    """A bad sample with ``fatal_bad_samples=True`` (image errors raise `ImageLoadError` instead)."""


# What to do about a bad sample of a dataset, by reason (load_image's own messages speak of the file only).
BAD_SAMPLE_ADVICE = {
    "missing_file": "; check that the image folder flag points at the folder holding the dataset's images "
                    "and that they are fully extracted",
    "corrupt_image": "; re-download or re-extract it, or drop it from the annotations",
}


class BadSample(NamedTuple):
    """What a dataset returns instead of a sample it cannot use: the file at fault, why
    (``"missing_file"``, ``"corrupt_image"``, ``"too_large"``, ``"empty_caption"``, ``"empty_text"``: an
    empty VQA question or NLVR2 sentence) and a message naming the file and the fix. A small picklable
    tuple, so it crosses from DataLoader workers."""
    path: str
    reason: str
    message: str

    @classmethod
    def from_error(cls, err: ImageLoadError) -> "BadSample":
        return cls(err.path, err.reason, f"{err}{BAD_SAMPLE_ADVICE.get(err.reason, '')}")


def drop_bad_samples(samples: Sequence[Any]) -> Tuple[List[Any], Dict[str, Any]]:
    """(the good samples, the batch's bad-sample keys): ``num_bad`` and ``bad_samples`` (the
    `BadSample` of each dropped sample, at most a batch of small tuples). Every collator calls this."""
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    return good, {"num_bad": len(bad), "bad_samples": bad}


class BadSampleReporter:
    """Warns about bad samples in the process that reads the batches (module docstring): once per
    (file, reason) for as long as the reporter lives (a run: every epoch, every DataLoader worker),
    and at most ``max_warnings`` files per reason; ``counts`` counts every occurrence by reason."""

    def __init__(self, max_warnings: int = 10):
        self.max_warnings = max_warnings
        self.counts: collections.Counter = collections.Counter()
        self.warned: Set[Tuple[str, str]] = set()
        self.warned_per_reason: collections.Counter = collections.Counter()

    def report(self, bad_samples: Iterable[BadSample]) -> None:
        for bad in bad_samples:
            self.counts[bad.reason] += 1
            key = (bad.path, bad.reason)
            if key in self.warned or self.warned_per_reason[bad.reason] >= self.max_warnings:
                continue
            self.warned.add(key)
            self.warned_per_reason[bad.reason] += 1
            suffix = (f" (further '{bad.reason}' files are not named; the epoch summary still counts them)"
                      if self.warned_per_reason[bad.reason] == self.max_warnings else "")
            warnings.warn(f"skipping bad sample: {bad.message}{suffix}", BadSampleWarning, stacklevel=2)


def describe_bad_samples(bad_samples: Sequence[BadSample]) -> str:
    """The first bad files with their reasons and, when all of them are missing, the folder that is
    likely wrong: the part of their common folder that does not exist, or a folder that exists but
    holds none of them (a wrong image-root flag, or images not extracted)."""
    if not bad_samples:
        return "no bad file was named (see the warnings above)"
    text = "first bad files: " + ", ".join(f"{b.path} ({b.reason})" for b in bad_samples)
    if all(b.reason == "missing_file" for b in bad_samples):
        folder = os.path.commonpath([os.path.dirname(os.path.abspath(b.path)) for b in bad_samples])
        existing = folder
        while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        where = (f"{folder} does not exist (the nearest folder that does is {existing})" if existing != folder
                 else f"{folder} exists but holds none of them")
        text += (f". All of these are missing and {where}: the image folder flag most likely names the wrong "
                 "root, or the images are not extracted there")
    return text


class BadDataError(UserError):
    pass


@dataclass
class BadSampleTally:
    """The good and bad samples of one pass over a dataset (a training epoch, an evaluation), counted
    from the batches' ``num_samples`` / ``num_bad`` / ``bad_samples``; the first few `BadSample` are kept
    for the error message. The Trainer and `pixel_bert.downstream.predict_sharded` both count with it."""
    good: int = 0
    bad: int = 0
    first: List[BadSample] = field(default_factory=list)

    def add(self, batch: Dict[str, Any]) -> None:
        self.good += int(batch.get("num_samples", 0))
        self.bad += int(batch.get("num_bad", 0))
        self.first += list(batch.get("bad_samples", []))[: max(0, 5 - len(self.first))]

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def too_many(self, max_fraction: float) -> bool:
        """More than ``max_fraction`` of the samples seen were bad."""
        return self.bad > 0 and self.bad > max_fraction * self.seen

    def describe(self) -> str:
        return describe_bad_samples(self.first)
