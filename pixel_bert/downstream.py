"""What the downstream tasks of Sec. 4.2 share: the interface a task module implements for
finetune.py and evaluate.py (`DownstreamTask`), the evaluation fields every task has
(`DownstreamConfig`), and distributed prediction (`predict_sharded`, `evaluate_split`).

A task module (`pixel_bert.vqa`, `pixel_bert.nlvr2`, `pixel_bert.retrieval`) holds everything of
its task: its config fields, its presets, reading its files, its dataset and training step, its
predictions and the call of its official metric; `pixel_bert.tasks.TASKS` maps each task's name to
it. Adding a task is one new module with a `DownstreamTask` subclass and one entry there (docs/tasks.md).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from .bad_samples import BadDataError, BadSampleReporter, BadSampleTally
from .config import check_fields
from .distributed import DistInfo, broadcast_from_main, gather_to_main, sharded_loader
from .files import write_json
from .precision import eval_autocast
from .progress import Progress
from .runs import TrainingData


@dataclass
class DownstreamConfig:
    """Fine-tuning fields every task has (each task's own fields are its module's config class)."""
    eval_batch_size: int = 64             # images or questions per evaluation batch (per process)

    ALLOWED: ClassVar[Dict[str, Any]] = {"eval_batch_size": (1, None)}  # see pixel_bert.model.allowed_values

    def __post_init__(self):
        check_fields(self)


@dataclass
class EvalSettings:
    """How to run an evaluation: batch sizes, workers, subsets, the retrieval feature cache, protocol
    and score blocks."""
    batch_size: int = 64
    pairs_per_batch: int = 1024
    num_workers: int = 0
    max_examples: Optional[int] = None
    max_captions: Optional[int] = None
    feature_cache: Optional[str] = None
    checkpoint: Optional[str] = None
    fold_size: Optional[int] = None  # COCO 1K fold size; None: 1000, or n_images / 5 under protocol "1k"
    protocol: str = "5k"             # retrieval: "5k" the whole matrix, "1k" only the COCO 1K fold blocks
    score_blocks: str = "auto"       # retrieval: folder of the resumable score blocks; "auto":
                                     # FEATURE_CACHE/score_blocks or OUT_DIR/retrieval_blocks; "none": in memory
    images_per_block: int = 16       # retrieval: image rows per score block (what a kill loses, per rank)
    max_bad_fraction: float = 0.0  # share of the items that may be unreadable (answered blind, counted);
                                   # 0: none, the rule of retrieval evaluation: a score is of every item


# The synthetic CPU demo's overrides common to every task (each task adds its own ``demo_overrides``).
DEMO_COMMON = dict(num_workers=1, log_every=20, ckpt_every=500, group_by_aspect_ratio=False)


class DownstreamTask(ABC):
    """A downstream task of Sec. 4.2 as finetune.py and evaluate.py use it.

    Class attributes describe the task; the methods read its data, build its training set and
    evaluate a model on one split with the official metric. A subclass overrides what differs.
    """
    name: ClassVar[str]
    config_class: ClassVar[Optional[type]] = None   # the task's own config fields (flags), or None
    data_flags: ClassVar[Tuple[str, str]]            # argparse dests: (annotations, images)
    presets: ClassVar[Dict[str, Dict[str, Any]]]     # TrainConfig overrides: the paper's recipe(s)
    demo_overrides: ClassVar[Dict[str, Any]]         # on top of the preset for the synthetic demo
    synthetic_sizes: ClassVar[Tuple[int, int, int]]  # (train, val, test) of the synthetic demo data
    val_split: ClassVar[str]                         # finetune.py's evaluation split (never a test split)
    default_split: ClassVar[str]                     # evaluate.py's default split

    @abstractmethod
    def add_data_arguments(self, group) -> None:
        """The task's data-path flags (the official layouts, docs/paper.md#data-formats)."""

    @abstractmethod
    def image_root(self, args) -> str:
        """The image folder the data flags give (the images flag, else the task's default)."""

    def preset(self, args) -> str:
        """The paper's recipe for this run's data (``--preset auto``)."""
        return next(iter(self.presets))

    def init_state(self, state: Dict[str, torch.Tensor], task_cfg, log) -> Dict[str, torch.Tensor]:
        """The ``--init`` checkpoint's state dict as this task's model starts from it."""
        return state

    def skip_evaluation(self, split: str, task_cfg) -> Optional[str]:
        """Why finetune.py must not evaluate on ``split`` after training (e.g. it trained on it), or None."""
        return None

    def check_files(self, args, task_cfg, split: Optional[str]) -> None:
        """finetune.py, before the first step: read and check whole the files its own evaluation of
        ``split`` will read (None: no evaluation), so that a missing, broken or unlabelled evaluation
        file stops the run now, naming the file and the entry, and not after training with no result.
        (The training files are read and checked by `training_data`, also before the first step.)"""
        if split is not None and not self.skip_evaluation(split, task_cfg):
            self.check_evaluation_files(args, split)

    @abstractmethod
    def check_evaluation_files(self, args, split: str) -> None:
        """Read ``split`` as `evaluate` does and refuse it unless every example has its labels:
        finetune.py's evaluation scores (evaluate.py predicts unlabelled files)."""

    @abstractmethod
    def training_data(self, args, task_cfg, model_cfg, train_cfg, tokenizer, device, out_dir, log) -> TrainingData:
        """The training set of the data flags (``task_cfg``: an instance of ``config_class``, or None)."""

    @abstractmethod
    def evaluate(self, model, tokenizer, args, split: str, info: DistInfo, out_dir: str,
                 answers: Optional[List[str]], settings: EvalSettings, log) -> Dict[str, Any]:
        """Predict ``split`` and score it (rank 0 writes the predictions); {} on other ranks."""


def require_flags(args, *flags: str):
    missing = [f for f in flags if not getattr(args, f.lstrip("-").replace("-", "_"))]
    if missing:
        raise SystemExit(f"error: {' '.join(missing)} required for this task (see --help)")


def evaluate_split(task: DownstreamTask, model, tokenizer, args, split: str, info: DistInfo, out_dir: str,
                   answers: Optional[List[str]] = None, settings: EvalSettings = EvalSettings(),
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run ``model`` on ``split`` of ``task`` and score it with the official metric (protocols in
    docs/paper.md). Rank 0 writes the predictions / scores and ``metrics_{task}_{split}.json`` into
    ``out_dir``; every rank returns the same metrics dict."""
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
    result: Dict[str, Any] = {"task": task.name, "split": split}
    result.update(task.evaluate(model, tokenizer, args, split, info, out_dir, answers, settings, log) or {})
    if info.is_main:
        write_json(os.path.join(out_dir, f"metrics_{task.name}_{split}.json"), result)
    return broadcast_from_main(result, info)


# -------------------------------------------------------------------------------------------------
#                                   Distributed prediction
# -------------------------------------------------------------------------------------------------

def check_splits(split: str, forbidden: Sequence[str] = ("test",), what: str = "model selection"):
    """Refuse a test split where only val/dev is allowed (docs/paper.md#pitfalls-of-peer-systems)."""
    if any(split.startswith(f) for f in forbidden):
        raise ValueError(f"split {split!r} is a test split: it must never be used for {what} "
                         "(see docs/paper.md). Use the val/dev split; evaluate.py scores test splits.")


@torch.no_grad()
def predict_sharded(model, dataset, collate_fn, info: DistInfo, predict_batch: Callable, batch_size: int = 64,
                    num_workers: int = 0, unit: str = "examples", label: str = "",
                    max_bad_fraction: float = 0.0) -> Optional[Dict[Any, Any]]:
    """Predictions for every item of ``dataset``: each rank runs its contiguous shard in eval mode under
    autocast, with a progress line, and rank 0 gets the merged ``{id: prediction}`` (None elsewhere).
    ``predict_batch(model, batch, device) -> {id: prediction}`` for a batch's good samples; the ids of
    bad samples (unreadable images) are missing, and the task fills them in. Each bad file is warned
    about once; when more than ``max_bad_fraction`` of all the items (every rank's, counted with one
    `BadSampleTally`) are bad, every rank stops with `BadDataError` naming the count and the first
    files: a score of questions answered without their image is no score of the model."""
    model.eval()  # the wrapper itself, so that a torch.compile'd model runs compiled
    loader = sharded_loader(dataset, info, batch_size, collate_fn, num_workers)
    progress = Progress(len(loader.dataset), unit, info, label=label)
    preds: Dict[Any, Any] = {}
    reporter, tally = BadSampleReporter(), BadSampleTally()
    for batch in loader:
        if batch["num_samples"]:
            with eval_autocast(info.device):
                preds.update(predict_batch(model, batch, info.device))
        reporter.report(batch["bad_samples"])
        tally.add(batch)
        progress.update(batch["num_samples"] + batch["num_bad"])
    progress.update(0, force=True)
    gathered = gather_to_main((preds, tally), info)
    refusal = None
    if gathered is not None:
        total = BadSampleTally()
        for _, part in gathered:
            total.add({"num_samples": part.good, "num_bad": part.bad, "bad_samples": part.first})
        refusal = bad_evaluation_message(total, unit, max_bad_fraction)
    refusal = broadcast_from_main(refusal, info)  # every rank stops, not only rank 0
    if refusal:
        raise BadDataError(refusal)
    return None if gathered is None else {k: v for part, _ in gathered for k, v in part.items()}


def bad_evaluation_message(tally: BadSampleTally, unit: str, max_bad_fraction: float) -> Optional[str]:
    """Why an evaluation with these bad items gives no score, or None when it may be scored."""
    if not tally.too_many(max_bad_fraction) and not (tally.bad and not tally.good):
        return None
    share = (f"every one of the {tally.seen} {unit} was bad" if not tally.good else
             f"{tally.bad} of the {tally.seen} {unit} were bad, more than the {max_bad_fraction:g} allowed "
             "(EvalSettings.max_bad_fraction)")
    return (f"no score: {share} (unreadable images), and an answer given without its image is no answer of "
            f"the model; {tally.describe()}")
