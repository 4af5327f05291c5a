"""What the three downstream tasks share (Sec. 4.2 of the paper; docs/paper.md): their configuration fields,
and the plumbing of a distributed evaluation (sharding, gathering, autocast, progress lines).

``TaskConfig`` holds every fine-tuning detail that docs/paper.md marks [paper] or [choice] and that is
not already a `pixel_bert.config.TrainConfig` field (answer-vocabulary threshold, retrieval
negatives, ...). finetune.py turns each field into a flag with `cli.add_config_arguments`.
The task modules (`vqa`, `nlvr2`, `retrieval`) take plain arguments, so they do not depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .bad_samples import BadDataError, BadSampleReporter, describe_bad_samples
from .distributed import DistInfo, gather_to_main, sharded_loader
from .precision import eval_autocast
from .progress import Progress


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













def check_splits(split: str, forbidden: Sequence[str] = ("test",), what: str = "model selection"):
    """Refuse a test split where only val/dev is allowed (docs/paper.md#pitfalls-of-peer-systems)."""
    if any(split.startswith(f) for f in forbidden):
        raise ValueError(f"split {split!r} is a test split: it must never be used for {what} "
                         "(see docs/paper.md). Use the val/dev split; evaluate.py scores test splits.")




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
