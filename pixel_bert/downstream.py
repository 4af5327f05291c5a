"""What the three downstream tasks share (Sec. 4.2 of the paper; docs/paper.md): their configuration fields,
and the plumbing of a distributed evaluation (sharding, gathering, autocast, progress lines).

``TaskConfig`` holds every fine-tuning detail that docs/paper.md marks [paper] or [choice] and that is
not already a `pixel_bert.config.TrainConfig` field (answer-vocabulary threshold, retrieval
negatives, ...). finetune.py turns each field into a flag with `config.add_config_arguments`.
The task modules (`vqa`, `nlvr2`, `retrieval`) take plain arguments, so they do not depend on it.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .bad_samples import BadSampleReporter, describe_bad_samples
from .engine import BadDataError, DistInfo, format_seconds


@dataclass
class TaskConfig:
    # ---- VQA 2.0 (Sec. 4.2 of the paper) --------------------------------------------------------
    vqa_min_answer_count: int = 9         # answers in >= this many train+val questions form the
                                          # vocabulary: 3,129 answers on VQA 2.0 [choice: community standard]
    vqa_drop_unanswerable: bool = False   # drop training questions with no answer in the vocabulary;
                                          # default keeps them with an all-zero target [choice: common practice]
    # ---- image-text retrieval (Sec. 4.2 of the paper) -------------------------------------------
    retrieval_negatives: int = 20         # negatives per positive pair [paper]
    retrieval_hard_negatives: int = 5     # negatives with the highest loss that get gradients [paper]
    retrieval_negative_kind: str = "both"  # "both": half the negatives pair the image with captions of
                                          # other images, half the caption with other images; "captions"
                                          # / "images": only one kind [choice: the paper does not say]
    retrieval_loss: str = "hard6"         # which reading of "back-propagate only through the 5 negatives with
                                          # the highest loss": "hard6" softmax over the positive + 5 hardest;
                                          # "all21" over all 21, the 15 easy scores constant; "all21_offsets"
                                          # over all 21, the easy ones as offsets from the positive [choice:
                                          # README "Retrieval loss" has the measurement]
    retrieval_head_from_itm: bool = True  # start the retrieval score layer from a pre-training checkpoint's
                                          # ITM classifier (both are Linear(h, 1) on [CLS] ranking matched
                                          # pairs above unmatched ones), so ranking starts from what ITM
                                          # learned; False: a new layer [choice: the paper does not say]
    # ---- evaluation ------------------------------------------------------------------------------
    eval_batch_size: int = 64             # images or questions per evaluation batch (per process)
    retrieval_eval_pairs: int = 1024      # image-caption pairs scored per forward pass in retrieval evaluation

    def __post_init__(self):
        if self.retrieval_loss not in ("hard6", "all21", "all21_offsets"):
            raise ValueError(f"retrieval_loss must be hard6/all21/all21_offsets, got {self.retrieval_loss!r}")
        if self.retrieval_negative_kind not in ("both", "captions", "images"):
            raise ValueError(f"retrieval_negative_kind must be both/captions/images, "
                             f"got {self.retrieval_negative_kind!r}")
        if not 0 < self.retrieval_hard_negatives <= self.retrieval_negatives:
            raise ValueError(f"need 0 < retrieval_hard_negatives ({self.retrieval_hard_negatives}) <= "
                             f"retrieval_negatives ({self.retrieval_negatives})")
        if self.vqa_min_answer_count < 1:
            raise ValueError(f"vqa_min_answer_count must be >= 1, got {self.vqa_min_answer_count}")


# -------------------------------------------------------------------------------------------------
#                                   Distributed evaluation
# -------------------------------------------------------------------------------------------------

def shard_range(n: int, info: DistInfo) -> range:
    """The contiguous block of ``range(n)`` this rank evaluates. Blocks never overlap and cover
    everything, so gathered results have no duplicates (unlike DistributedSampler, which pads
    with repeated items to equalise ranks)."""
    per = -(-n // info.world_size) if n else 0  # ceil
    start = min(info.rank * per, n)
    return range(start, min(start + per, n))


def gather_to_main(obj: Any, info: DistInfo) -> Optional[List[Any]]:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); ``[obj]`` without torchrun.
    Uses gather_object (pickles through the process group; fine for predictions and score
    blocks of a few hundred MB)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the metrics, so every rank returns the same)."""
    if info.world_size == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def eval_dtype(device: torch.device, amp: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype of inference: bf16 (or fp16) on CUDA, None on CPU (as engine.amp_settings)."""
    from .config import TrainConfig
    from .engine import amp_settings
    return amp_settings(TrainConfig(amp=amp), device).dtype


def eval_autocast(device: torch.device, amp: str = "auto"):
    """Autocast for inference (`eval_dtype`); nothing on CPU."""
    dtype = eval_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Progress:
    """A progress line every ``every`` seconds: done/total, rate in ``unit``/s and ETA. Only the
    main rank prints; with sharding each rank reports its own share, so rank 0's line is
    representative (all shards are the same size up to one item)."""

    def __init__(self, total: int, unit: str, info: DistInfo, every: float = 10.0, label: str = "",
                 stream=None):
        self.total, self.unit, self.every, self.label = total, unit, every, label
        self.enabled = info.is_main
        self.stream = stream or sys.stdout
        self.start = self.last = time.time()
        self.done = 0

    def update(self, n: int, force: bool = False):
        self.done += n
        now = time.time()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.label}{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%)  "
                  f"{rate:,.0f} {self.unit}/s  eta {format_seconds(eta)}", file=self.stream, flush=True)


def check_splits(split: str, forbidden: Sequence[str] = ("test",), what: str = "model selection"):
    """Refuse a test split where only val/dev is allowed (docs/paper.md#pitfalls-of-peer-systems)."""
    if any(split.startswith(f) for f in forbidden):
        raise ValueError(f"split {split!r} is a test split: it must never be used for {what} "
                         "(see docs/paper.md). Use the val/dev split; evaluate.py scores test splits.")


def sharded_loader(dataset, info: DistInfo, batch_size: int, collate_fn, num_workers: int = 0):
    """A DataLoader over this rank's contiguous block of ``dataset`` (see `shard_range`), in order."""
    subset = torch.utils.data.Subset(dataset, list(shard_range(len(dataset), info)))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                       num_workers=num_workers, pin_memory=info.device.type == "cuda")


@torch.no_grad()
def predict_sharded(model, dataset, collate_fn, info: DistInfo, predict_batch: Callable, batch_size: int = 64,
                    num_workers: int = 0, unit: str = "examples", label: str = "") -> Optional[Dict[Any, Any]]:
    """Predictions for every item of ``dataset``: each rank runs its contiguous shard in eval mode under
    autocast, with a progress line, and rank 0 gets the merged ``{id: prediction}`` (None elsewhere).
    ``predict_batch(model, batch, device) -> {id: prediction}`` for a batch's good samples; the ids of
    bad samples (unreadable images) are missing, and the task fills them in. Each bad file is warned
    about once; a shard whose every item is bad stops with `BadDataError` (a wrong image folder must
    not produce a metrics file)."""
    model.eval()  # the wrapper itself, so that a torch.compile'd model runs compiled
    loader = sharded_loader(dataset, info, batch_size, collate_fn, num_workers)
    progress = Progress(len(loader.dataset), unit, info, label=label)
    preds: Dict[Any, Any] = {}
    reporter, first_bad, good = BadSampleReporter(), [], 0
    for batch in loader:
        if batch["num_samples"]:
            with eval_autocast(info.device):
                preds.update(predict_batch(model, batch, info.device))
        reporter.report(batch["bad_samples"])
        first_bad += batch["bad_samples"][: 5 - len(first_bad)]
        good += batch["num_samples"]
        progress.update(batch["num_samples"] + batch["num_bad"])
    progress.update(0, force=True)
    if first_bad and not good:
        raise BadDataError(f"every one of the {len(loader.dataset)} {unit} of this shard was bad: "
                           f"{describe_bad_samples(first_bad)}")
    gathered = gather_to_main(preds, info)
    return None if gathered is None else {k: v for part in gathered for k, v in part.items()}
