"""Check the real datasets before a long run, and fetch the publicly downloadable ones.

    python -m pixel_bert.datasets verify --coco-karpathy data/karpathy/dataset_coco.json \\
        --coco-images data/coco --vg-regions data/vg/region_descriptions.json \\
        --vg-image-data data/vg/image_data.json --vg-images data/vg --workers 16 --report verify.json
    python -m pixel_bert.datasets download coco karpathy vg vqa --root data
    python -m pixel_bert.datasets download nlvr2          # how to obtain it (a request form)

``verify`` takes the data flags of train.py and finetune.py (any subset) and, for each dataset:

1. reads the annotation files with the very reader functions training uses (`pixel_bert.annotations`,
   `pixel_bert.vqa`, `pixel_bert.nlvr2`, `pixel_bert.retrieval`), so that verify and training
   can never disagree about the layout; a missing or malformed file is reported with the
   reader's message (file, entry, fix);
2. counts records and distinct images per split and compares them with the sizes of the official
   releases (`OFFICIAL_SIZES`): a difference is a warning, since subsets are legitimate;
3. opens every referenced image with `pixel_bert.images.load_image` in ``--workers`` processes,
   so "unreadable" means exactly what training would hit (missing file, truncated or corrupt
   data, decompression bomb), with a progress line (done/total, images/s, ETA);
4. prints a table per dataset and the flags to give train.py / finetune.py for these paths.

A split is unusable, and the exit status 1, when its file is missing or malformed, when it has no
record, or when more than ``--max-bad-fraction`` of its images are missing or unreadable (training
skips bad samples, so a few are harmless). Retrieval val/test allow none: the evaluation scores
every image against every caption and refuses to score while any image is unreadable (naming them all).

``download`` fetches the archives of `SOURCES` into ``--root`` and unpacks them into the layout
the loaders read (see `layout_flags`). torchvision's ``download_url`` cannot resume a partial
download (it rewrites the file from byte 0) and leaves an unverified file under the final name,
so the transfer is our own small loop on urllib with HTTP Range: bytes go to ``NAME.part``, an
interrupted transfer resumes where it stopped (``--retries`` times in one run, and again on the
next run), and the final name appears only for a complete file whose md5 matches (or, where no
md5 is published, whose size matches the server's). Archives are unpacked with torchvision's
``extract_archive`` into a temporary folder (zipfile checks every member's CRC-32) and moved into
place only when whole. Flickr30K and NLVR2 images are given out on request only: ``download
flickr30k`` / ``download nlvr2`` print where to ask and where to put the files, and exit 1.
"""
from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torchvision.datasets.utils import calculate_md5, extract_archive

from . import nlvr2 as nlvr2_data, retrieval, vqa
from .annotations import karpathy_coco_ids, read_coco_captions, read_karpathy, read_visual_genome
from .cli import add_debug_argument, int_at_least, run_cli
from .distributed import DistInfo
from .files import write_json
from .images import ImageLoadError, load_image
from .progress import Progress, RateClock
from .tasks import TASKS
from .train import add_pretrain_data_arguments

# ------------------------------------------------------------------------------------------------
# Official sizes
# ------------------------------------------------------------------------------------------------

# (dataset, split) -> (records, distinct images) of the official release; None: not compared.
# Where each figure comes from:
# - COCO Karpathy (dataset_coco.json): 113,287 train+restval / 5,000 val / 5,000 test images, the
#   split every COCO retrieval paper uses (Karpathy & Fei-Fei 2015).
# - Flickr30K Karpathy (dataset_flickr30k.json): 29,000 / 1,014 / 1,000 images (same source).
# - COCO 2014 captions_{train,val}2014.json: 82,783 / 40,504 images (the COCO 2014 release, also the
#   VQA 2.0 image counts below).
# - Visual Genome v1.2 (image_data.json, region_descriptions.json): 108,077 images
#   (visualgenome.org statistics).
# - VQA 2.0 (visualqa.org): questions train2014 443,757, val2014 214,354, test2015 447,793 (of which
#   test-dev2015 107,394); images 82,783 / 40,504 / 81,434 (test2015).
# - NLVR2 (github.com/lil-lab/nlvr, nlvr2/data): dev.json 6,982 and test1.json 6,967 examples, 8,102
#   and 8,082 images (2 per image pair), counted from the files; train 86,373 examples = the
#   published total 107,292 minus dev, test1 and the hidden test2 (6,970 lines).
OFFICIAL_SIZES: Dict[Tuple[str, str], Tuple[Optional[int], Optional[int]]] = {
    ("coco", "train+restval"): (None, 113_287),
    ("coco", "val"): (None, 5_000),
    ("coco", "test"): (None, 5_000),
    ("flickr30k", "train"): (None, 29_000),
    ("flickr30k", "val"): (None, 1_014),
    ("flickr30k", "test"): (None, 1_000),
    ("coco-captions", "captions_train2014.json"): (None, 82_783),
    ("coco-captions", "captions_val2014.json"): (None, 40_504),
    ("vg", "all"): (None, 108_077),
    ("vqa", "train2014"): (443_757, 82_783),
    ("vqa", "val2014"): (214_354, 40_504),
    ("vqa", "test-dev2015"): (107_394, None),
    ("vqa", "test2015"): (447_793, 81_434),
    ("nlvr2", "train"): (86_373, None),
    ("nlvr2", "dev"): (6_982, 8_102),
    ("nlvr2", "test1"): (6_967, 8_082),
}

# The data flags of train.py (pre-training) and finetune.py (per task), by argparse dest.
PRETRAIN_FLAGS = ("coco_karpathy", "coco_images", "coco_captions", "coco_captions_images",
                  "vg_regions", "vg_image_data", "vg_images")
TASK_FLAGS = {name: task.data_flags for name, task in TASKS.items()}


# ------------------------------------------------------------------------------------------------
# verify: reading the annotations
# ------------------------------------------------------------------------------------------------

@dataclass
class SplitCheck:
    """One row of a table: a split as the loaders read it, then what the image check found."""
    name: str
    records: int = 0
    image_paths: List[str] = field(default_factory=list)   # distinct, in the order first referenced
    official: Tuple[Optional[int], Optional[int]] = (None, None)
    max_bad: Optional[float] = None      # allowed share of bad images (None: --max-bad-fraction)
    error: str = ""                      # why the split cannot be read at all
    absent: bool = False                 # an optional split that is not there
    notes: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unreadable: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, reason, message)
    problems: List[str] = field(default_factory=list)   # why it is unusable
    warnings: List[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.absent:
            return "absent"
        return "UNUSABLE" if self.problems else ("warning" if self.warnings else "ok")


@dataclass
class DatasetCheck:
    """A dataset given on the command line: its rows and the script flags for its paths."""
    key: str
    title: str
    flags: Dict[str, str]                # argparse dest -> path (image roots resolved)
    splits: List[SplitCheck] = field(default_factory=list)


def _distinct(paths: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(paths))


def _read_split(name: str, official_key: str, read: Callable[[], Tuple[int, List[str]]],
                hint: str = "") -> SplitCheck:
    """Run a reader; ``read`` returns (records, image paths). A reader error makes an error row."""
    try:
        records, paths = read()
    except (OSError, ValueError) as err:  # FileNotFoundError, AnnotationError, ValueError of the readers
        return SplitCheck(name, error=f"{err}{hint}")
    return SplitCheck(name, records, _distinct(paths), OFFICIAL_SIZES.get((official_key, name), (None, None)))


def resolve_image_roots(args) -> Dict[str, Optional[str]]:
    """All data flags, with each image root defaulted exactly as finetune.py / evaluate.py do when it
    is not given (each task's `image_root`; train.py for --coco-captions-images)."""
    paths = {dest: getattr(args, dest, None) for dest in PRETRAIN_FLAGS + sum(TASK_FLAGS.values(), ())}
    for task in TASKS.values():
        annotations, images = task.data_flags
        if paths[annotations] and not paths[images]:
            paths[images] = task.image_root(args)
    if paths["coco_captions"] and not paths["coco_captions_images"]:
        paths["coco_captions_images"] = os.path.join(os.path.dirname(paths["coco_captions"]), "images")
    return paths


def check_pretrain_coco(paths: Dict[str, Optional[str]]) -> DatasetCheck:
    """train.py --coco-karpathy: Karpathy train + restval (`data.read_karpathy`)."""
    json_path, images = paths["coco_karpathy"], paths["coco_images"]
    check = DatasetCheck("coco-karpathy", f"COCO Karpathy captions for pre-training: {json_path}",
                         {"coco_karpathy": json_path, "coco_images": images})
    if not images:  # the error train.py raises
        check.splits.append(SplitCheck("train+restval", error="--coco-karpathy needs --coco-images "
                                       "(the folder holding train2014/ and val2014/)"))
        return check

    def read():
        records = read_karpathy(json_path, images, splits=("train", "restval"))
        return len(records), [r.image_path for r in records]
    check.splits.append(_read_split("train+restval", "coco", read, _hint("karpathy", "coco")))
    return check


def check_coco_captions(paths: Dict[str, Optional[str]]) -> DatasetCheck:
    """train.py --coco-captions: one COCO captions_*.json (`data.read_coco_captions`)."""
    json_path, images = paths["coco_captions"], paths["coco_captions_images"]
    check = DatasetCheck("coco-captions", f"COCO captions for pre-training: {json_path}",
                         {"coco_captions": json_path, "coco_captions_images": images})

    def read():
        records = read_coco_captions(json_path, images)
        return len(records), [r.image_path for r in records]
    check.splits.append(_read_split(os.path.basename(json_path), "coco-captions", read, _hint("coco")))
    return check


def check_visual_genome(paths: Dict[str, Optional[str]]) -> DatasetCheck:
    """train.py --vg-*: regions of every VG image except the COCO Karpathy val/test ones, as train.py
    reads them (`data.read_visual_genome` with `data.karpathy_coco_ids`)."""
    dests = ("vg_regions", "vg_image_data", "vg_images")
    check = DatasetCheck("vg", f"Visual Genome regions: {paths['vg_regions']}", {d: paths[d] for d in dests})
    if not all(paths[d] for d in dests):  # the error train.py raises
        check.splits.append(SplitCheck("all", error="--vg-regions needs --vg-image-data and --vg-images"))
        return check
    excluded: List[str] = []

    def read():
        exclude = (karpathy_coco_ids(paths["coco_karpathy"], ("val", "test")) if paths["coco_karpathy"]
                   else set())
        # Read once without the exclusion to count what it removes: a record is excluded exactly when
        # its key is "coco:<id>" for an excluded id (read_visual_genome's own rule).
        records = read_visual_genome(paths["vg_regions"], paths["vg_image_data"], paths["vg_images"])
        excluded_keys = {f"coco:{i}" for i in exclude}
        kept = [r for r in records if r.image_key not in excluded_keys]
        excluded.extend(_distinct(r.image_path for r in records if r.image_key in excluded_keys))
        return len(kept), [r.image_path for r in kept]
    split = _read_split("all", "vg", read, _hint("vg"))
    if not split.error:
        if excluded:
            split.notes.append(f"left out, as train.py does: {len(excluded):,} image(s) of the COCO Karpathy "
                               "val/test splits (no retrieval test image in pre-training)")
            split.official = (None, split.official[1] - len(excluded))
        if not paths["coco_karpathy"]:
            split.warnings.append("no --coco-karpathy: train.py cannot leave out the VG images of the COCO "
                                  "Karpathy val/test splits (retrieval evaluation would leak)")
    check.splits.append(split)
    return check


def check_vqa(paths: Dict[str, Optional[str]]) -> DatasetCheck:
    """finetune.py --task vqa: every split (`vqa.read_vqa`); train2014 and val2014 are required and
    annotated (finetune.py trains on one and evaluates on the other), the test splits optional."""
    root, images = paths["vqa_root"], paths["vqa_images"]
    check = DatasetCheck("vqa", f"VQA 2.0: {root}", {"vqa_root": root, "vqa_images": images})
    for split in ("train2014", "val2014", "test-dev2015", "test2015"):
        required = not split.startswith("test")
        if not required and not _exists(vqa.vqa_files, root, split):
            check.splits.append(SplitCheck(split, absent=True, notes=["not present (only evaluate.py uses it)"]))
            continue
        annotated: List[bool] = []

        def read(split=split):
            result = vqa.read_vqa(root, split, images)
            annotated.append(result.annotations is not None)
            return len(result.questions), [q.image_path for q in result.questions]
        row = _read_split(split, "vqa", read, _hint("vqa"))
        if required and annotated == [False]:
            row.error = (f"{os.path.join(root, f'v2_mscoco_{split}_annotations.json')}: file not found; "
                         f"finetune.py needs the answers of {split}{_hint('vqa')}")
        check.splits.append(row)
    return check


def _exists(find_file: Callable, *args) -> bool:
    """Whether a loader's own file-finding function (e.g. `vqa.vqa_files`) finds the file."""
    try:
        find_file(*args)
    except FileNotFoundError:
        return False
    return True


def check_nlvr2(paths: Dict[str, Optional[str]]) -> DatasetCheck:
    """finetune.py --task nlvr2: train.json and dev.json (required), test1.json (optional), read by
    `nlvr2.read_nlvr2`; two images per example."""
    root, images = paths["nlvr2_root"], paths["nlvr2_images"]
    check = DatasetCheck("nlvr2", f"NLVR2: {root}", {"nlvr2_root": root, "nlvr2_images": images})
    for split in ("train", "dev", "test1"):
        if split == "test1" and not os.path.isfile(os.path.join(root, "test1.json")):
            check.splits.append(SplitCheck(split, absent=True, notes=["not present (only evaluate.py uses it)"]))
            continue

        def read(split=split):
            examples = nlvr2_data.read_nlvr2(os.path.join(root, f"{split}.json"), images)
            return len(examples), [p for ex in examples for p in (ex.left_path, ex.right_path)]
        check.splits.append(_read_split(split, "nlvr2", read, _hint("nlvr2")))
    return check


def check_retrieval(paths: Dict[str, Optional[str]]) -> DatasetCheck:
    """finetune.py --task retrieval: the training split(s) as finetune.py picks them (train + restval
    when the file's "dataset" field says coco, else train; `data.read_karpathy`) and val / test as the evaluation
    reads them (`retrieval.read_karpathy_eval`), which allows no unreadable image."""
    json_path, images = paths["karpathy_json"], paths["retrieval_images"]
    check = DatasetCheck("retrieval", f"Retrieval (Karpathy): {json_path}",
                         {"karpathy_json": json_path, "retrieval_images": images})
    names: List[str] = []   # the json's "dataset" field, as read_karpathy_eval reports it

    def read_eval(split):
        result = retrieval.read_karpathy_eval(json_path, images, split)
        names.append(result.dataset)
        return len(result.captions), result.image_paths
    eval_rows = [_read_split(split, "", lambda split=split: read_eval(split), _hint("karpathy")) for split in
                 ("val", "test")]
    train_splits = ("train", "restval") if names and retrieval.is_coco(json_path) else ("train",)

    def read_train():
        records = read_karpathy(json_path, images, splits=train_splits)
        return len(records), [r.image_path for r in records]
    train_row = _read_split("+".join(train_splits), "", read_train, _hint("karpathy"))
    for row in eval_rows:
        row.max_bad = 0.0
        row.notes.append("retrieval evaluation stops at the first unreadable image: none may be bad")
    for row in [train_row] + eval_rows:
        if names and not row.error:
            row.official = OFFICIAL_SIZES.get((names[0], row.name), (None, None))
    check.splits = [train_row] + eval_rows
    return check


def _hint(*names: str) -> str:
    """How to obtain a dataset, appended to a reader's error."""
    return f"\n    to get it: python -m pixel_bert.datasets download {' '.join(names)} --root DIR"


# Verify order: pre-training data first, then the three tasks. (flags that name the dataset, check)
CHECKS = ((("coco_karpathy",), check_pretrain_coco), (("coco_captions",), check_coco_captions),
          (("vg_regions", "vg_image_data", "vg_images"), check_visual_genome), (("vqa_root",), check_vqa),
          (("nlvr2_root",), check_nlvr2), (("karpathy_json",), check_retrieval))


def read_datasets(paths: Dict[str, Optional[str]], log=print) -> List[DatasetCheck]:
    """Read the annotations of every dataset whose flags are given (no image is opened yet)."""
    checks = []
    for dests, check in CHECKS:
        if any(paths[dest] for dest in dests):
            started = time.time()
            checks.append(check(paths))
            log(f"read {checks[-1].title} ({time.time() - started:.1f} s)")
    return checks


# ------------------------------------------------------------------------------------------------
# verify: opening the images
# ------------------------------------------------------------------------------------------------

def _open_image(path: str) -> Tuple[str, str, str]:
    """(path, reason, message) after `data.load_image`; reason "" when the image loads."""
    try:
        load_image(path)
    except ImageLoadError as err:
        return path, err.reason, str(err)
    return path, "", ""


def _file_exists(path: str) -> Tuple[str, str, str]:
    if os.path.isfile(path):
        return path, "", ""
    return path, "missing_file", f"{path}: image file not found"


def check_images(paths: Sequence[str], workers: int, decode: bool = True,
                 progress_every: float = 10.0) -> Dict[str, Tuple[str, str]]:
    """{path: (reason, message)} of the images that fail to load (reasons of `data.ImageLoadError`:
    missing_file, corrupt_image, too_large), opening ``paths`` in ``workers`` processes. With
    ``decode=False`` only the files' existence is checked."""
    check = _open_image if decode else _file_exists
    progress = Progress(len(paths), "images", DistInfo(), every=progress_every, stream=sys.stderr)
    bad: Dict[str, Tuple[str, str]] = {}

    def consume(results):
        for path, reason, message in results:
            if reason:
                bad[path] = (reason, message)
            progress.update(1)
    if workers > 1 and len(paths) > 1:
        with multiprocessing.Pool(workers) as pool:
            consume(pool.imap_unordered(check, paths, chunksize=max(1, min(64, len(paths) // (4 * workers)))))
    else:
        consume(map(check, paths))
    progress.update(0, force=True)
    return bad


def judge(split: SplitCheck, bad: Dict[str, Tuple[str, str]], max_bad_fraction: float) -> None:
    """Fill a row's missing / unreadable lists, its problems (unusable) and warnings (sizes)."""
    if split.absent:
        return
    if split.error:
        split.problems.append(split.error)
        return
    for path in split.image_paths:
        if path in bad:
            reason, message = bad[path]
            if reason == "missing_file":
                split.missing.append(path)
            else:
                split.unreadable.append((path, reason, message))
    n_images, n_bad = len(split.image_paths), len(split.missing) + len(split.unreadable)
    allowed = max_bad_fraction if split.max_bad is None else split.max_bad
    if split.records == 0:
        split.problems.append("no records")
    elif n_bad > allowed * n_images:
        split.problems.append(f"{n_bad:,} of {n_images:,} images missing or unreadable "
                              f"({100 * n_bad / n_images:.2f}% > {100 * allowed:g}% allowed)")
    absent_dirs = [d for d in _distinct(os.path.dirname(p) for p in split.missing) if not os.path.isdir(d)]
    if absent_dirs:
        split.notes.append(f"folder(s) not found: {', '.join(absent_dirs[:3])}{' ...' if len(absent_dirs) > 3 else ''}"
                           "; is the image folder flag right? (layouts: --help, docs/data.md)")
    differences = [f"{got:,} {what} (official {official:,})" for what, got, official in (
        ("records", split.records, split.official[0]), ("images", n_images, split.official[1]))
        if official is not None and got != official]
    if differences:
        split.warnings.append(" and ".join(differences) + ": fine for a subset, not for a partial download")


# ------------------------------------------------------------------------------------------------
# verify: tables, flags, report
# ------------------------------------------------------------------------------------------------

def _count(n: Optional[int]) -> str:
    return "-" if n is None else f"{n:,}"


def format_table(check: DatasetCheck, decoded: bool = True, show: int = 5) -> List[str]:
    """The table of one dataset, then per split the first ``show`` bad paths, problems and warnings."""
    header = ("split", "records", "official", "images", "official", "missing", "unreadable", "status")
    rows = [header] + [_row(s, decoded) for s in check.splits]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [check.title]
    for row in rows:
        cells = [c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    for s in check.splits:
        lines += [f"  {s.name}: UNUSABLE: {p}" for p in s.problems]
        lines += _listing(s.name, "missing", s.missing, show)
        unreadable = [f"{p}  [{reason}] {_reason_text(m, p)}" for p, reason, m in s.unreadable]
        lines += _listing(s.name, "unreadable", unreadable, show,
                          advice=" (re-download or re-extract them, or drop them from the annotations)")
        lines += [f"  {s.name}: warning: {w}" for w in s.warnings] + [f"  {s.name}: note: {n}" for n in s.notes]
    return lines


def _row(s: SplitCheck, decoded: bool) -> Tuple[str, ...]:
    """The table cells of a split ("-" where nothing was read)."""
    if s.absent or s.error:
        return s.name, "-", _count(s.official[0]), "-", _count(s.official[1]), "-", "-", s.status
    unreadable = _count(len(s.unreadable)) if decoded else "not checked"
    return (s.name, _count(s.records), _count(s.official[0]), _count(len(s.image_paths)), _count(s.official[1]),
            _count(len(s.missing)), unreadable, s.status)


def _listing(split: str, what: str, items: Sequence[str], show: int, advice: str = "") -> List[str]:
    """``split: what (count)advice:`` and the first ``show`` items, one a line."""
    if not items:
        return []
    more = [f"      ... and {len(items) - show:,} more (all of them in --report)"] if len(items) > show else []
    return [f"  {split}: {what} ({len(items):,}){advice}:"] + [f"      {item}" for item in items[:show]] + more


def _reason_text(message: str, path: str) -> str:
    """The gist of a load_image message: without the path (given already) and the advice after ';'."""
    text = message[len(path) + 2:] if message.startswith(path + ": ") else message
    text = text.replace(f" {path!r}", "").split("; ")[0]
    return text if len(text) <= 110 else text[:107] + "..."


def script_command(flags: Dict[str, Optional[str]]) -> str:
    """``python train.py ...`` or ``python finetune.py --task T ...`` with these data flags (absolute paths)."""
    task = next((t for t, dests in TASK_FLAGS.items() if set(flags) & set(dests)), None)
    args = " ".join(f"--{dest.replace('_', '-')} {shlex.quote(os.path.abspath(path))}"
                    for dest, path in flags.items() if path)
    return f"python finetune.py --task {task} {args}" if task else f"python train.py {args}"


def script_commands(flags: Dict[str, Optional[str]]) -> List[str]:
    """One command per script: all the pre-training data in one train.py line, a finetune.py line per task."""
    groups = [PRETRAIN_FLAGS] + list(TASK_FLAGS.values())
    selected = [{dest: flags[dest] for dest in group if flags.get(dest)} for group in groups]
    return [script_command(group) for group in selected if group]


def report_dict(checks: Sequence[DatasetCheck], max_bad_fraction: float, decoded: bool) -> dict:
    """Everything verify found, every bad path included (for --report)."""
    def split_dict(s: SplitCheck) -> dict:
        return {"split": s.name, "status": s.status, "records": s.records, "images": len(s.image_paths),
                "official_records": s.official[0], "official_images": s.official[1], "missing": s.missing,
                "unreadable": [{"path": p, "reason": r, "message": m} for p, r, m in s.unreadable],
                "problems": s.problems, "warnings": s.warnings, "notes": s.notes}
    return {"ok": all(s.status != "UNUSABLE" for c in checks for s in c.splits),
            "max_bad_fraction": max_bad_fraction, "images_decoded": decoded,
            "commands": script_commands({d: p for c in checks for d, p in c.flags.items()}),
            "datasets": [{"dataset": c.key, "title": c.title, "flags": c.flags,
                          "splits": [split_dict(s) for s in c.splits]} for c in checks]}


def run_verify(args) -> int:
    """The ``verify`` command: 0 when every split is usable, 1 otherwise."""
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    checks = read_datasets(resolve_image_roots(args), log)
    images = _distinct(p for c in checks for s in c.splits for p in s.image_paths)
    log(f"{'opening' if not args.no_decode else 'looking for'} {len(images):,} images with {args.workers} "
        f"worker process(es)")
    bad = check_images(images, args.workers, decode=not args.no_decode, progress_every=args.progress_every)
    for check in checks:
        for split in check.splits:
            judge(split, bad, args.max_bad_fraction)
    for check in checks:
        print("\n".join(format_table(check, decoded=not args.no_decode, show=args.show)) + "\n")
    report = report_dict(checks, args.max_bad_fraction, not args.no_decode)
    unusable = [f"{c.key} {s.name}" for c in checks for s in c.splits if s.status == "UNUSABLE"]
    print("result: " + (f"UNUSABLE split(s): {', '.join(unusable)}" if unusable else
                        "every split is usable" + (" (see the warnings)" if any(
                            s.warnings for c in checks for s in c.splits) else "")))
    print("flags for these paths:\n" + "\n".join(f"  {command}" for command in report["commands"]))
    if args.report:
        write_json(args.report, report, indent=1)
        print(f"report: {args.report}")
    return 1 if unusable else 0


# ------------------------------------------------------------------------------------------------
# download
# ------------------------------------------------------------------------------------------------

# name -> what it is, and its archives: url; md5 (None: none published); "into", the folder under
# --root it unpacks into; "gives", the paths under --root that exist once it is unpacked.
# md5: COCO's own site lists none; these are the values in several independent public download
# scripts (annotations_trainval2014.zip's is also the ETag its S3 bucket reports). No md5 is
# published for the Karpathy, Visual Genome or VQA archives: they are checked by size (against the
# server's Content-Length) and by the CRC-32 of every member while unpacking.
SOURCES = {
    "coco": {"about": "COCO 2014 train/val images and captions (pre-training, VQA, COCO retrieval)", "files": [
        {"url": "http://images.cocodataset.org/zips/train2014.zip", "md5": "0da8c0bd3d6becc4dcb32757491aca88",
         "into": "coco", "gives": ["coco/train2014"]},
        {"url": "http://images.cocodataset.org/zips/val2014.zip", "md5": "a3d79f5ed8d289b7a7554ce06a5782b3",
         "into": "coco", "gives": ["coco/val2014"]},
        {"url": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
         "md5": "0a379cfc70b0e71301e0f377548639bd", "into": "coco",
         "gives": ["coco/annotations/captions_train2014.json", "coco/annotations/captions_val2014.json"]}]},
    "coco-test2015": {"about": "COCO 2015 test images (VQA test-dev / test only)", "files": [
        {"url": "http://images.cocodataset.org/zips/test2015.zip", "md5": "65562e58af7d695cc47356951578c041",
         "into": "coco", "gives": ["coco/test2015"]}]},
    "karpathy": {"about": "Karpathy splits dataset_coco.json / dataset_flickr30k.json", "files": [
        {"url": "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip", "md5": None,
         "into": "karpathy", "gives": ["karpathy/dataset_coco.json", "karpathy/dataset_flickr30k.json"]}]},
    "vg": {"about": "Visual Genome images, region descriptions and image data (pre-training)", "files": [
        {"url": "https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "md5": None,
         "into": "vg", "gives": ["vg/VG_100K"]},
        {"url": "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "md5": None,
         "into": "vg", "gives": ["vg/VG_100K_2"]},
        {"url": "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/region_descriptions.json.zip",
         "md5": None, "into": "vg", "gives": ["vg/region_descriptions.json"]},
        {"url": "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/image_data.json.zip",
         "md5": None, "into": "vg", "gives": ["vg/image_data.json"]}]},
    "vqa": {"about": "VQA 2.0 questions and annotations (images: coco, coco-test2015)", "files": [
        {"url": f"https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/{name}.zip", "md5": None, "into": "vqa",
         "gives": [f"vqa/{g}" for g in gives]} for name, gives in (
            ("v2_Questions_Train_mscoco", ["v2_OpenEnded_mscoco_train2014_questions.json"]),
            ("v2_Questions_Val_mscoco", ["v2_OpenEnded_mscoco_val2014_questions.json"]),
            ("v2_Questions_Test_mscoco", ["v2_OpenEnded_mscoco_test-dev2015_questions.json",
                                          "v2_OpenEnded_mscoco_test2015_questions.json"]),
            ("v2_Annotations_Train_mscoco", ["v2_mscoco_train2014_annotations.json"]),
            ("v2_Annotations_Val_mscoco", ["v2_mscoco_val2014_annotations.json"]))]},
}

# Datasets whose images are given out on request only: where to ask, where to put the files.
MANUAL_SOURCES = {
    "flickr30k": """Flickr30K images are given out on request: fill in the form at https://forms.illinois.edu/sec/229675
(dataset page: http://shannon.cs.illinois.edu/DenotationGraph/), download flickr30k-images.tar.gz and unpack it so
that the images are
    {root}/flickr30k/flickr30k-images/<flickr id>.jpg
The Karpathy split comes with `python -m pixel_bert.datasets download karpathy --root {root}`. Then check it:
    python -m pixel_bert.datasets verify --karpathy-json {root}/karpathy/dataset_flickr30k.json \\
        --retrieval-images {root}/flickr30k/flickr30k-images""",
    "nlvr2": """NLVR2 images are given out on request: see "Direct image download" in
https://github.com/lil-lab/nlvr/tree/master/nlvr2 (a Google form and terms of service). The sentences are public:
nlvr2/data/train.json, dev.json and test1.json of https://github.com/lil-lab/nlvr. Put them so that
    {root}/nlvr2/data/train.json, dev.json, test1.json
    {root}/nlvr2/images/train/<directory>/train-<set>-<pair>-img0.png and -img1.png
    {root}/nlvr2/images/dev/dev-<set>-<pair>-img0.png ...   {root}/nlvr2/images/test1/...
Then check it:
    python -m pixel_bert.datasets verify --nlvr2-root {root}/nlvr2/data --nlvr2-images {root}/nlvr2/images""",
}

MIRROR_ENV = "PIXEL_BERT_DATA_MIRROR"   # same as --base-url
USER_AGENT = "pixel-bert-datasets/1.0 (python urllib)"


class DownloadError(RuntimeError):
    """A download or unpacking failed; the message says what was kept and how to go on."""


def source_url(url: str, mirror: Optional[str]) -> str:
    """The address to fetch: ``url``, or its file name under ``mirror`` (--base-url / $PIXEL_BERT_DATA_MIRROR)."""
    return f"{mirror.rstrip('/')}/{os.path.basename(url)}" if mirror else url


class ByteProgress:
    """A download progress line every ``every`` seconds: MB done/total, MB/s, ETA."""

    def __init__(self, label: str, done: int, total: Optional[int], every: float, stream=None):
        self.label, self.done, self.total, self.every = label, done, total, every
        self.stream = stream or sys.stderr
        self.clock = RateClock(total, done)  # a resumed download's earlier bytes are not in its rate
        self.last = self.clock.start

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.time()
        if force or now - self.last >= self.every:
            self.last = now
            rate = self.clock.rate(self.done)
            of = f"/{self.total / 1e6:,.1f} MB ({100 * self.done / max(self.total, 1):.1f}%)" if self.total else " MB"
            eta = f"  eta {self.clock.eta(self.done)}" if self.total else ""
            print(f"  {self.label}: {self.done / 1e6:,.1f}{of}  {rate / 1e6:,.1f} MB/s{eta}", file=self.stream,
                  flush=True)


def _content_range(header: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, full size) of a ``Content-Range: bytes FIRST-LAST/SIZE`` (or ``bytes */SIZE``) header."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None
    first, size = match.groups()
    return (int(first) if first else None), (int(size) if size != "*" else None)


def _fetch_range(url: str, part: str, every: float, log) -> Optional[int]:
    """Append to ``part`` the bytes of ``url`` after the ones it holds (an HTTP Range request) and
    return the file's full size when the server tells it. A server that ignores Range sends the
    whole file, which then replaces the part."""
    start = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={start}-"} if start else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not start:
            raise
        size = _content_range(err.headers.get("Content-Range"))[1]   # nothing after `start`
        if size != start:
            os.remove(part)
            raise ConnectionError(f"{part} does not match the file on the server; starting afresh") from err
        return size
    with response:
        first, size = _content_range(response.headers.get("Content-Range"))
        if start and response.status == 206:
            if first != start:
                raise ConnectionError(f"asked for byte {start:,} on, the server sent from byte {first}")
            mode = "ab"
            log(f"  {os.path.basename(part)}: resuming at byte {start:,}")
        else:
            start, mode, size = 0, "wb", response.length
        progress = ByteProgress(os.path.basename(url), start, size, every)
        with open(part, mode) as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                progress.update(len(chunk))
        progress.update(0, force=True)
    return size


def download_file(url: str, archive: str, md5: Optional[str], retries: int = 3, every: float = 5.0,
                  log=print) -> None:
    """Download ``url`` to ``archive``: bytes go to ``archive.part``, an interrupted transfer resumes
    (up to ``retries`` times here, and on the next run), and ``archive`` appears only once the file is
    whole: its md5 matches ``md5``, or, without one, its size matches the server's."""
    part = archive + ".part"
    for attempt in range(retries + 1):
        try:
            size = _fetch_range(url, part, every, log)
            if size is None or os.path.getsize(part) == size:
                break
            problem = f"the connection ended at byte {os.path.getsize(part):,} of {size:,}"
        except urllib.error.HTTPError as err:
            if err.code < 500:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}; is the address right? (--base-url, "
                                    f"${MIRROR_ENV})") from err
            problem = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            problem = f"{type(err).__name__}: {err}"
        kept = os.path.getsize(part) if os.path.exists(part) else 0
        if attempt == retries:
            raise DownloadError(f"{url}: {problem}. {kept:,} bytes are kept in {part}: run the same command "
                                "again to resume")
        log(f"  {os.path.basename(archive)}: {problem}; retry {attempt + 1} of {retries} from byte {kept:,}")
        time.sleep(min(2 ** attempt - 1, 30))
    if md5 is not None:
        got = calculate_md5(part)
        if got != md5:
            os.remove(part)
            raise DownloadError(f"{url}: md5 {got}, but the published md5 is {md5}: the download is corrupt or the "
                                "file changed on the server. The bad file was deleted; run again to download it "
                                "afresh, or try another mirror (--base-url)")
        log(f"  {os.path.basename(archive)}: md5 matches")
    os.replace(part, archive)


def _merge_tree(src: str, dst: str) -> None:
    """Move everything under ``src`` into ``dst``, merging folders both have, then remove ``src``."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        source, target = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(source) and os.path.isdir(target):
            _merge_tree(source, target)
        else:
            os.replace(source, target)
    os.rmdir(src)


def unpack(archive: str, into: str, gives: Sequence[str], log=print) -> None:
    """Unpack ``archive`` (torchvision's extract_archive) into a temporary folder inside ``into``, then
    move its contents into place; a corrupt archive (bad CRC-32, truncated) is deleted and leaves
    nothing behind. ``gives``: the paths that must exist afterwards."""
    staging = os.path.join(into, f".unpacking-{os.path.basename(archive)}")
    shutil.rmtree(staging, ignore_errors=True)
    log(f"  unpacking {os.path.basename(archive)} into {into}")
    try:
        extract_archive(archive, staging)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
        shutil.rmtree(staging, ignore_errors=True)
        os.remove(archive)
        raise DownloadError(f"{archive}: corrupt archive ({err}); it was deleted: run again to download it "
                            "afresh") from err
    _merge_tree(staging, into)
    missing = [path for path in gives if not os.path.exists(path)]
    if missing:
        raise DownloadError(f"{archive} was unpacked into {into}, but {', '.join(missing)} is not there: the "
                            f"archive's layout is not the expected one (found: {', '.join(sorted(os.listdir(into)))})")


def _plan(spec: dict, root: str) -> Tuple[str, List[str], str]:
    """(archive path, paths it gives, state): unpacked / downloaded / partial / to fetch."""
    gives = [os.path.join(root, g) for g in spec["gives"]]
    archive = os.path.join(root, "downloads", os.path.basename(spec["url"]))
    if all(os.path.exists(g) for g in gives):
        return archive, gives, "unpacked"
    if os.path.isfile(archive):
        return archive, gives, "downloaded"
    if os.path.isfile(archive + ".part"):
        return archive, gives, f"partial ({os.path.getsize(archive + '.part'):,} bytes)"
    return archive, gives, "to fetch"


def fetch_source(spec: dict, root: str, mirror: Optional[str], retries: int, keep_archive: bool,
                 every: float, log=print) -> None:
    """Download one archive of `SOURCES` into ROOT/downloads and unpack it (skipped if already unpacked)."""
    archive, gives, state = _plan(spec, root)
    if state == "unpacked":
        log(f"{os.path.basename(archive)}: already unpacked ({', '.join(spec['gives'])})")
        return
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    if state != "downloaded":
        url = source_url(spec["url"], mirror)
        log(f"{os.path.basename(archive)}: {url} ({'md5 ' + spec['md5'] if spec['md5'] else 'no md5 published'})")
        download_file(url, archive, spec["md5"], retries, every, log)
    unpack(archive, os.path.join(root, spec["into"]), gives, log)
    if not keep_archive:
        os.remove(archive)


def layout_flags(root: str) -> Dict[str, str]:
    """The data flags (argparse dest -> path) for what the standard layout under ``root`` holds:
    coco/{train2014,val2014,test2015}/, karpathy/dataset_*.json, vg/{VG_100K,VG_100K_2}/ with
    vg/region_descriptions.json and vg/image_data.json, vqa/*.json, flickr30k/flickr30k-images/,
    nlvr2/data/*.json with nlvr2/images/."""
    def p(*parts):
        return os.path.join(root, *parts)
    flags: Dict[str, str] = {}
    if os.path.isfile(p("karpathy", "dataset_coco.json")) and os.path.isdir(p("coco", "train2014")):
        flags.update(coco_karpathy=p("karpathy", "dataset_coco.json"), coco_images=p("coco"))
    if all(os.path.exists(p("vg", x)) for x in ("region_descriptions.json", "image_data.json", "VG_100K")):
        flags.update(vg_regions=p("vg", "region_descriptions.json"), vg_image_data=p("vg", "image_data.json"),
                     vg_images=p("vg"))
    if os.path.isfile(p("vqa", "v2_OpenEnded_mscoco_train2014_questions.json")):
        flags.update(vqa_root=p("vqa"), vqa_images=p("coco"))
    if os.path.isfile(p("nlvr2", "data", "train.json")):
        flags.update(nlvr2_root=p("nlvr2", "data"), nlvr2_images=p("nlvr2", "images"))
    if os.path.isfile(p("karpathy", "dataset_flickr30k.json")) and os.path.isdir(p("flickr30k", "flickr30k-images")):
        flags.update(karpathy_json=p("karpathy", "dataset_flickr30k.json"),
                     retrieval_images=p("flickr30k", "flickr30k-images"))
    elif "coco_karpathy" in flags:
        flags.update(karpathy_json=flags["coco_karpathy"], retrieval_images=p("coco"))
    return flags


def _print_plan(names: Sequence[str], root: str, mirror: Optional[str]) -> None:
    for name in names:
        print(f"{name}: {SOURCES[name]['about']}")
        for spec in SOURCES[name]["files"]:
            archive, _, state = _plan(spec, root)
            check = f"md5 {spec['md5']}" if spec["md5"] else "size + CRC-32 (no md5 published)"
            print(f"  {state:>10}  {source_url(spec['url'], mirror)}\n"
                  f"              -> {os.path.join(root, spec['into'])}/ giving {', '.join(spec['gives'])}; {check}")


def run_download(args) -> int:
    """The ``download`` command: 0 when every named public dataset is in place, 1 otherwise."""
    names = list(dict.fromkeys(n for name in args.names for n in (SOURCES if name == "all" else [name])))
    root, mirror = os.path.abspath(args.root), args.base_url or os.environ.get(MIRROR_ENV)
    public, manual = [n for n in names if n in SOURCES], [n for n in names if n in MANUAL_SOURCES]
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    failed = []
    if args.dry_run:
        _print_plan(public, root, mirror)
    for name in public if not args.dry_run else ():
        for spec in SOURCES[name]["files"]:
            try:
                fetch_source(spec, root, mirror, args.retries, args.keep_archives, args.progress_every, log)
            except DownloadError as err:
                failed.append(os.path.basename(spec["url"]))
                print(f"error: {err}", file=sys.stderr)
    for name in manual:
        print(MANUAL_SOURCES[name].format(root=root) + "\n")
    if public and not args.dry_run and not failed:
        flags = layout_flags(root)
        verify_args = " ".join(f"--{d.replace('_', '-')} {shlex.quote(p)}" for d, p in flags.items())
        print(f"in place under {root}. Check it, then train:\n  python -m pixel_bert.datasets verify {verify_args}\n"
              + "\n".join(f"  {command}" for command in script_commands(flags)))
    if failed:
        print(f"failed: {', '.join(failed)} (see the errors above)", file=sys.stderr)
    return 1 if failed or manual else 0


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _add_verify_arguments(p: argparse.ArgumentParser) -> None:
    add_debug_argument(p)
    add_pretrain_data_arguments(p, "pre-training data (train.py's flags)")
    data = p.add_argument_group("fine-tuning data (finetune.py's and evaluate.py's flags)")
    for task in TASKS.values():
        task.add_data_arguments(data)
    check = p.add_argument_group("checking")
    check.add_argument("--workers", type=int_at_least(1), default=os.cpu_count() or 1,
                       help="processes opening images in parallel (default: all CPU cores)")
    check.add_argument("--max-bad-fraction", type=float, default=0.01,
                       help="a split is unusable when more than this share of its images is missing or unreadable "
                            "(default 0.01; retrieval val/test always allow none)")
    check.add_argument("--no-decode", action="store_true",
                       help="only check that every image file exists (seconds instead of minutes; corrupt files "
                            "go unnoticed)")
    check.add_argument("--show", type=int_at_least(0), default=5, help="bad paths listed per split and kind (default 5)")
    check.add_argument("--report", help="write everything found, every bad path included, to this JSON file")
    check.add_argument("--progress-every", type=float, default=10.0,
                       help="seconds between progress lines while opening images (default 10)")


def _add_download_arguments(p: argparse.ArgumentParser) -> None:
    add_debug_argument(p)
    about = "; ".join(f"{name}: {source['about']}" for name, source in SOURCES.items())
    p.add_argument("names", nargs="+", choices=sorted(SOURCES) + sorted(MANUAL_SOURCES) + ["all"], metavar="NAME",
                   help=f"what to fetch ({about}; all: every one of these). flickr30k, nlvr2: print how to obtain "
                        "them (request forms) and exit 1")
    p.add_argument("--root", default="data", help="folder to unpack into: ROOT/coco, ROOT/karpathy, ROOT/vg, "
                   "ROOT/vqa; archives are kept in ROOT/downloads while in transit (default: data)")
    p.add_argument("--base-url", default=None, help=f"fetch every file by its name from this address instead (a "
                   f"mirror, or a local server in tests); also ${MIRROR_ENV}")
    p.add_argument("--retries", type=int_at_least(0), default=3, help="times an interrupted download resumes before giving up "
                   "(it resumes on the next run too; default 3)")
    p.add_argument("--keep-archives", action="store_true", help="keep the archives in ROOT/downloads after unpacking")
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched, from where, into where, and "
                   "how it is checked; fetch nothing")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between download progress lines")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pixel_bert.datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_verify_arguments(commands.add_parser(
        "verify", help="check annotation files and images before a run", description="Check the datasets "
        "given (any subset of train.py's and finetune.py's data flags) as training will read them."))
    _add_download_arguments(commands.add_parser(
        "download", help="fetch and unpack the public datasets", description="Download and unpack public "
        "datasets into the layout the loaders read, resuming interrupted downloads."))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "download":
        return run_download(args)
    paths = resolve_image_roots(args)
    if not any(paths[dest] for dests, _ in CHECKS for dest in dests):
        parser.error("verify: give the annotation flag of at least one dataset: --coco-karpathy, --coco-captions, "
                     "--vg-regions, --vqa-root, --nlvr2-root or --karpathy-json (see --help)")
    if args.workers < 1 or not 0 <= args.max_bad_fraction <= 1:
        parser.error("verify: --workers must be >= 1 and --max-bad-fraction within 0..1")
    return run_verify(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
