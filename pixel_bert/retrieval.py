"""Image-text retrieval: ranking fine-tuning with hard negatives (Sec. 4.2 of the paper), and the
task as finetune.py and evaluate.py run it (docs/paper.md#evaluation-protocols).

Training (Sec. 4.2). Every positive (image, caption) pair of a batch gets ``num_negatives`` = 20
negatives drawn from the same batch [paper: 20; where they come from is our choice]:

* ``negative_kind="both"`` (default): 10 pair the positive's *image* with captions of other
  images (text negatives) and 10 pair the positive's *caption* with other images (image
  negatives), so the model learns to rank in both retrieval directions;
* ``"captions"`` / ``"images"``: only one of the two kinds.

A negative never shares the positive's image (judged by image key). The retrieval head scores
the 21 pairs and a softmax cross-entropy puts the positive first. Hard negative mining [paper:
"back-propagate only through the 5 negatives with the highest loss"], precisely:

1. all 21 scores are computed without gradients (one cheap forward pass, no graph kept);
2. the 5 negatives with the highest scores are the ones with the highest loss: in
   -log(e^{s+} / sum e^{s}) a negative's share of the loss and of the gradient grows with its
   score, so "highest loss" = "highest score";
3. the positive and those 5 are scored again with gradients (so the backward pass costs 6 pairs,
   not 21), and the loss is a softmax cross-entropy: over these 6 scores ("hard6", the default),
   or over all 21 with the 15 easy scores as constants ("all21") or as offsets from the positive
   ("all21_offsets"); `hard_negative_loss` gives each form's gradient. In every form, gradients
   flow through the positive and the 5 hard negatives only (RetrievalConfig.retrieval_loss).

The CNN is frozen (TrainConfig.freeze_backbone, set by the retrieval presets; finetune.py calls
PixelBert.freeze_backbone); the visual projection and s_v of eq. (5) still train unless
TrainConfig.freeze_visual_proj.

The evaluation (the whole score matrix at scale) is `pixel_bert.retrieval_scoring`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from . import metrics
from .annotations import AnnotationError, json_field, json_list, karpathy_images, read_json, read_karpathy
from .batches import CaptionCollator, CaptionDataset, aspect_ratio_group_ids
from .config import check_fields
from .distributed import unwrap
from .downstream import DownstreamTask, EvalSettings, require_flags
from .images import ImageTransform
from .losses import RETRIEVAL_LOSSES, hard_negative_loss
from .model import VisualTokens
from .retrieval_scoring import RetrievalSplit, evaluate_retrieval
from .runs import TrainingData


# -------------------------------------------------------------------------------------------------
#                                          Data
# -------------------------------------------------------------------------------------------------


def read_karpathy_eval(dataset_json: str, image_root: str, split: str = "test",
                       max_images: Optional[int] = None, max_captions: Optional[int] = None) -> RetrievalSplit:
    """The ``split`` ("val" or "test") of Karpathy's dataset_coco.json / dataset_flickr30k.json, in
    file order: COCO test = 5,000 images (the 5K set; its consecutive thousands are the 1K folds),
    Flickr30K test = 1,000 images. ``max_images`` keeps the first N images, ``max_captions`` at
    most that many captions per image (quick runs). Image paths as data.read_karpathy. An evaluation
    ranks every caption, so an image without one, or an empty caption, is refused (training skips and
    counts an empty caption, as pre-training)."""
    path, dataset, selected = karpathy_images(dataset_json, (split,))
    if max_images is not None:
        selected = selected[:max_images]
    if not selected:
        raise AnnotationError(f"{path}: no image in split {split!r}")
    paths, image_ids, captions, caption_ids, caption_image = [], [], [], [], []
    for row, (i, image) in enumerate(selected):
        where = f"images[{i}]"
        filename = json_field(image, "filename", str, where, path)
        filepath = json_field(image, "filepath", str, where, path) if "filepath" in image else ""
        paths.append(os.path.join(image_root, filepath, filename))
        image_ids.append(json_field(image, "cocoid", int, where, path) if "cocoid" in image
                         else os.path.splitext(filename)[0])
        sentences = json_list(image, "sentences", where, path)[:max_captions]
        if not sentences:
            raise AnnotationError(f"{path}: {where} has no sentences; every retrieval image needs a caption")
        for j, s in enumerate(sentences):
            w = f"{where}['sentences'][{j}]"
            captions.append(json_field(s, "raw", str, w, path).strip())
            if not captions[-1]:
                raise AnnotationError(f"{path}: {w} is an empty caption; an evaluation ranks every caption, "
                                      "so it takes no empty one")
            caption_ids.append(json_field(s, "sentid", int, w, path) if "sentid" in s else len(caption_ids))
            caption_image.append(row)
    if len({type(x) for x in image_ids}) > 1:  # a mix of int and str ids: store all as str
        image_ids = [str(x) for x in image_ids]
    return RetrievalSplit(paths, image_ids, captions, caption_ids, np.asarray(caption_image, dtype=np.int64),
                          dataset)


# -------------------------------------------------------------------------------------------------
#                                  Training: negatives and loss
# -------------------------------------------------------------------------------------------------

def sample_negatives(image_keys: Sequence[str], num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, num) indices of other batch items whose image differs from item i's, drawn uniformly;
    without replacement where the batch has enough other images, with replacement otherwise."""
    codes = {k: i for i, k in enumerate(dict.fromkeys(image_keys))}
    c = torch.tensor([codes[k] for k in image_keys])
    allowed = (c[:, None] != c[None, :]).float()                              # (B, B)
    if num == 0:
        return torch.zeros(len(c), 0, dtype=torch.long)
    if (allowed.sum(1) == 0).any():
        raise ValueError("a retrieval batch needs at least two different images for negatives; raise --batch_size")
    replacement = bool(num > allowed.sum(1).min())
    return torch.multinomial(allowed, num, replacement=replacement, generator=generator)


NEGATIVE_KINDS = ("both", "captions", "images")  # RetrievalConfig.retrieval_negative_kind


def negative_pairs(image_keys: Sequence[str], num_negatives: int, kind: str = "both",
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image rows, caption rows), each (B, 1 + num_negatives): column 0 is the positive (i, i),
    then the caption negatives (i, j) and the image negatives (j, i) (module docstring)."""
    B = len(image_keys)
    n_cap = {"both": num_negatives // 2, "captions": num_negatives, "images": 0}[kind]  # NEGATIVE_KINDS
    n_img = num_negatives - n_cap
    others = sample_negatives(image_keys, num_negatives, generator)          # (B, N)
    own = torch.arange(B)[:, None]
    img_rows = torch.cat([own, own.expand(B, n_cap), others[:, n_cap:]], dim=1)
    cap_rows = torch.cat([own, others[:, :n_cap], own.expand(B, n_img)], dim=1)
    return img_rows, cap_rows


ITM_TO_RETRIEVAL = {"itm.classifier.weight": "retrieval.score.weight", "itm.classifier.bias": "retrieval.score.bias"}


def itm_as_retrieval_head(state: Dict[str, torch.Tensor], log=print) -> Dict[str, torch.Tensor]:
    """A copy of a pre-training state dict whose ITM classifier (eq. 8's linear layer) also serves
    as the retrieval score layer (RetrievalConfig.retrieval_head_from_itm): the ITM logit already
    ranks matched pairs above unmatched ones. A state dict without an ITM head comes back as it is."""
    if not all(k in state for k in ITM_TO_RETRIEVAL):
        log("retrieval head: new (the checkpoint has no ITM head)")
        return state
    state = dict(state)
    for src, dst in ITM_TO_RETRIEVAL.items():
        state.setdefault(dst, state[src])  # a retrieval checkpoint keeps its own trained head
    log("retrieval head: initialised from the checkpoint's ITM classifier")
    return state


def _score(model, input_ids, attention_mask, visual: VisualTokens, chunk: Optional[int] = None):
    """Retrieval scores of aligned (text, visual) rows, in chunks of ``chunk`` pairs."""
    if chunk is None or len(input_ids) <= chunk:
        return model(input_ids, attention_mask, visual=visual)
    return torch.cat([model(input_ids[s:s + chunk], attention_mask[s:s + chunk], visual=visual[s:s + chunk])
                      for s in range(0, len(input_ids), chunk)])


def retrieval_step(model, batch: dict, device, num_negatives: int = 20, num_hard: int = 5,
                   negative_kind: str = "both", loss_form: str = "hard6",
                   score_chunk: int = 512) -> Dict[str, torch.Tensor]:
    """One micro-batch of ranking fine-tuning (module docstring): positives + 20 negatives each,
    the hard 5 found without gradients, then the loss through the positive and those 5. Both passes
    run in the model's current mode (training: the same dropout), so the hard negatives are chosen
    under the conditions they are trained in."""
    inner = unwrap(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    images, pixel_mask = batch["images"].to(device, non_blocking=True), batch["pixel_mask"].to(device)
    img_rows, cap_rows = negative_pairs(batch["image_keys"], num_negatives, negative_kind)
    img_rows, cap_rows = img_rows.to(device), cap_rows.to(device)
    B, W = img_rows.shape
    # The CNN runs once per image; every pair indexes the image's visual tokens. A frozen CNN
    # (PixelBert.freeze_backbone) keeps no graph; the projection conv and s_v do unless frozen too.
    visual = inner.bert.encode_image(images, pixel_mask)
    with torch.no_grad():
        flat_i, flat_c = img_rows.flatten(), cap_rows.flatten()
        all_scores = _score(inner, ids[flat_c], mask[flat_c], _detach(visual)[flat_i], score_chunk).view(B, W)
    hard_idx = all_scores[:, 1:].topk(num_hard, dim=1).indices                # (B, k) among the negatives
    cols = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), 1 + hard_idx], dim=1)
    sel_i, sel_c = img_rows.gather(1, cols).flatten(), cap_rows.gather(1, cols).flatten()
    # Through the (DDP) wrapper, so gradient synchronisation sees this forward pass.
    scores = model(ids[sel_c], mask[sel_c], visual=visual[sel_i]).view(B, 1 + num_hard)
    neg = all_scores[:, 1:].to(scores.dtype).scatter(1, hard_idx, scores[:, 1:])
    loss, _ = hard_negative_loss(scores[:, 0], neg, num_hard, loss_form, hard_idx)
    # Training R@1 among the 21: is the positive the top score?
    rank1 = (all_scores[:, :1] > all_scores[:, 1:]).all(1).float().mean()
    return dict(loss=loss, r1_of_21=rank1)


def _detach(v: VisualTokens) -> VisualTokens:
    return VisualTokens(v.embeddings.detach(), v.mask, v.positions, v.grid)


# -------------------------------------------------------------------------------------------------
#                                       Evaluation
# -------------------------------------------------------------------------------------------------


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray,
                      fold_size: Optional[int] = None) -> Dict[str, Any]:
    """R@1/5/10 both ways on the whole matrix (COCO 5K, Flickr30K 1K), plus the COCO 1K protocol
    (mean over 5 folds of ``fold_size`` images, default 1000) when the matrix has exactly 5 folds."""
    fold_size = fold_size or 1000
    out: Dict[str, Any] = {"recall": metrics.retrieval_recall(scores, caption_image)}
    if scores.shape[0] == 5 * fold_size:
        out["recall_1k_folds"] = metrics.coco_1k_recall(scores, caption_image, n_folds=5, fold_size=fold_size)
    return out


# -------------------------------------------------------------------------------------------------
#                             The task, as finetune.py and evaluate.py run it
# -------------------------------------------------------------------------------------------------

@dataclass
class RetrievalConfig:
    """Retrieval's fine-tuning and evaluation fields beyond `pixel_bert.config.TrainConfig` (Sec. 4.2)."""
    retrieval_negatives: int = 20         # negatives per positive pair [paper]
    retrieval_hard_negatives: int = 5     # negatives with the highest loss that get gradients [paper]
    retrieval_negative_kind: str = "both"  # "both": half the negatives pair the image with captions of
                                          # other images, half the caption with other images; "captions"
                                          # / "images": only one kind [choice: the paper does not say]
    retrieval_loss: str = "hard6"         # which reading of "back-propagate only through the 5 negatives with
                                          # the highest loss": "hard6" softmax over the positive + 5 hardest;
                                          # "all21" over all 21, the 15 easy scores constant; "all21_offsets"
                                          # over all 21, the easy ones as offsets from the positive [choice:
                                          # docs/retrieval.md has the measurement]
    retrieval_head_from_itm: bool = True  # start the retrieval score layer from a pre-training checkpoint's
                                          # ITM classifier (both are Linear(h, 1) on [CLS] ranking matched
                                          # pairs above unmatched ones), so ranking starts from what ITM
                                          # learned; False: a new layer [choice: the paper does not say]
    retrieval_eval_pairs: int = 1024      # image-caption pairs scored per forward pass in retrieval evaluation
    retrieval_val_images: int = 1000      # finetune.py's evaluation scores the first N val images x their captions
                                          # (COCO val: 1,000 x 5,000 pairs, not 5,000 x 25,000: minutes, not
                                          # hours; Flickr30K val: 1,000 of its 1,014); 0: every val image

    ALLOWED: ClassVar[Dict[str, Any]] = {  # see pixel_bert.model.allowed_values
        "retrieval_negatives": (1, None), "retrieval_hard_negatives": (1, None),
        "retrieval_negative_kind": NEGATIVE_KINDS, "retrieval_loss": RETRIEVAL_LOSSES, "retrieval_eval_pairs": (1, None),
        "retrieval_val_images": (0, None)}

    def __post_init__(self):
        check_fields(self)
        if self.retrieval_hard_negatives > self.retrieval_negatives:
            raise ValueError(f"need retrieval_hard_negatives ({self.retrieval_hard_negatives}) <= "
                             f"retrieval_negatives ({self.retrieval_negatives})")


def karpathy_dataset(karpathy_json: str) -> Optional[str]:
    """The ``"dataset"`` field of a Karpathy file ("coco", "flickr30k", "flickr8k"), None without one."""
    data = read_json(karpathy_json, "a Karpathy dataset_*.json with 'images'")
    dataset = data.get("dataset") if isinstance(data, dict) else None
    return dataset if isinstance(dataset, str) else None


def is_coco(karpathy_json: str) -> bool:
    """Whether a Karpathy file is COCO's, which trains on train + restval: its own ``"dataset"`` field
    says so, whatever the file is named."""
    return karpathy_dataset(karpathy_json) == "coco"


class Retrieval(DownstreamTask):
    """Image-text retrieval (Sec. 4.2): a linear score on [CLS], softmax over the positive and 20
    negatives with hard-negative mining, the CNN frozen; R@1/5/10 both ways."""
    name = "retrieval"
    config_class = RetrievalConfig
    data_flags = ("karpathy_json", "retrieval_images")
    presets = {"retrieval-f30k": dict(epochs=10, decay_epochs=(6,), batch_size=64, freeze_backbone=True),  # 8 GPUs [paper]
               "retrieval-coco": dict(epochs=4, decay_epochs=(2,), batch_size=64, freeze_backbone=True)}
    demo_overrides = dict(epochs=2, decay_epochs=(1,), batch_size=24, lr=5e-4, warmup_steps=30)
    synthetic_sizes = (1000, 100, 50)  # images, 5 captions each
    val_split, default_split = "val", "test"

    def add_data_arguments(self, group) -> None:
        group.add_argument("--karpathy-json", help="Karpathy dataset_coco.json or dataset_flickr30k.json")
        group.add_argument("--retrieval-images", help="image root: COCO's (holding train2014/ val2014/) or "
                           "Flickr30K's flickr30k-images/ folder (default: the json's folder)")

    def image_root(self, args) -> str:
        return args.retrieval_images or os.path.dirname(os.path.abspath(args.karpathy_json))

    def preset(self, args) -> str:
        return "retrieval-coco" if is_coco(args.karpathy_json) else "retrieval-f30k"

    def init_state(self, state, task_cfg: RetrievalConfig, log):
        return itm_as_retrieval_head(state, log) if task_cfg.retrieval_head_from_itm else state

    def check_evaluation_files(self, args, split: str) -> None:
        require_flags(args, "--karpathy-json")
        read_karpathy_eval(args.karpathy_json, self.image_root(args), split)

    def training_data(self, args, task_cfg: RetrievalConfig, model_cfg, train_cfg, tokenizer, device, out_dir,
                      log) -> TrainingData:
        dataset_name = karpathy_dataset(args.karpathy_json)
        coco = dataset_name == "coco"
        splits = ("train", "restval") if coco else ("train",)
        log(f"retrieval: {args.karpathy_json} says "
            + (f'"dataset": "{dataset_name}"' if dataset_name else 'no "dataset"')
            + (", so the COCO recipe (--preset auto: retrieval-coco), trained on train + restval" if coco else
               ", so the Flickr30K recipe (--preset auto: retrieval-f30k), trained on train")
            + " (the file's name plays no part)")
        records = read_karpathy(args.karpathy_json, self.image_root(args), splits=splits)
        if not records:
            raise AnnotationError(f"--karpathy-json {args.karpathy_json}: no caption in the {'/'.join(splits)} "
                                  "split(s), so it gives no training pair")
        dataset = CaptionDataset(records, ImageTransform.from_config(model_cfg),
                                 fatal_bad_samples=train_cfg.fatal_bad_samples)
        log(f"retrieval: {len(dataset)} training pairs from splits {splits}; {task_cfg.retrieval_negatives} "
            f"negatives ({task_cfg.retrieval_negative_kind}), {task_cfg.retrieval_hard_negatives} hard; CNN frozen: "
            f"{train_cfg.freeze_backbone}")
        groups = aspect_ratio_group_ids(records) if train_cfg.group_by_aspect_ratio else None
        collate = CaptionCollator(tokenizer, model_cfg.max_text_len, model_cfg.feature_stride)

        def step(model, batch, _):
            return retrieval_step(model, batch, device, task_cfg.retrieval_negatives,
                                  task_cfg.retrieval_hard_negatives, task_cfg.retrieval_negative_kind,
                                  task_cfg.retrieval_loss)
        return TrainingData(dataset, collate, step, groups, {})

    def evaluate(self, model, tokenizer, args, split, info, out_dir, answers, settings: EvalSettings,
                 log) -> Dict[str, Any]:
        require_flags(args, "--karpathy-json")
        cfg = unwrap(model).config
        data = read_karpathy_eval(args.karpathy_json, self.image_root(args), split, settings.max_examples,
                                  settings.max_captions)
        out = evaluate_retrieval(model, data, tokenizer, ImageTransform.from_config(cfg), cfg.max_text_len,
                                 info, settings.batch_size, settings.pairs_per_batch, settings.num_workers,
                                 settings.feature_cache, settings.checkpoint,
                                 log=log if info.is_main else (lambda *_: None), protocol=settings.protocol,
                                 fold_size=settings.fold_size, images_per_block=settings.images_per_block,
                                 blocks_dir=score_blocks_folder(settings, out_dir, split))
        if not info.is_main:
            return {}
        stats = out["stats"]
        if settings.protocol == "1k":
            result = fold_results(out["segments"], data, out_dir, split)
        else:
            path = metrics.save_score_matrix(os.path.join(out_dir, f"retrieval_{split}_scores.npz"), out["scores"],
                                             data.image_ids, data.caption_ids, data.caption_image)
            result = retrieval_metrics(out["scores"], data.caption_image, settings.fold_size)
            result.update(scores_file=path, chance_r1=100.0 / len(data.image_paths))
        result.update(stats)
        r = result["recall"] if settings.protocol == "5k" else result["recall_1k_folds"]
        shape = (f"{len(data.image_paths)} images x {len(data.captions)} captions" if settings.protocol == "5k" else
                 f"COCO 1K protocol: 5 folds of {result['fold_size']} images x their captions")
        log(f"retrieval {split} ({shape}, {stats['pairs_per_second']:.0f} pairs/s, {stats['blocks_reused']} of "
            f"{stats['blocks']} score blocks reused): TR R@1/5/10 {r['tr_r1']:.1f}/{r['tr_r5']:.1f}/{r['tr_r10']:.1f}"
            f"  IR R@1/5/10 {r['ir_r1']:.1f}/{r['ir_r5']:.1f}/{r['ir_r10']:.1f}  (chance R@1 "
            f"{result['chance_r1']:.1f}), wrote {result.get('scores_file') or result['scores_files'][0] + ' ...'}")
        return result


def score_blocks_folder(settings: EvalSettings, out_dir: str, split: str) -> Optional[str]:
    """Where the resumable score blocks of ``split`` go (EvalSettings.score_blocks), None for in memory."""
    if settings.score_blocks == "none":
        return None
    if settings.score_blocks != "auto":
        return os.path.join(settings.score_blocks, split)
    if settings.feature_cache:
        return os.path.join(settings.feature_cache, "score_blocks", split)
    return os.path.join(out_dir, "retrieval_blocks", split)


def fold_results(segments, data: RetrievalSplit, out_dir: str, split: str) -> Dict[str, Any]:
    """The COCO 1K protocol from its 5 fold blocks alone (Sec. 4.2): R@K averaged over the folds, each
    fold's R@K, and each fold's score matrix saved (``retrieval_<split>_fold<f>_scores.npz``)."""
    folds, paths = [], []
    for f, (segment, scores) in enumerate(segments):
        caption_image = data.caption_image[segment.columns] - segment.rows.start
        folds.append((scores, caption_image))
        image_ids = [data.image_ids[i] for i in segment.rows]
        caption_ids = [data.caption_ids[j] for j in segment.columns]
        paths.append(metrics.save_score_matrix(os.path.join(out_dir, f"retrieval_{split}_fold{f}_scores.npz"),
                                               scores, image_ids, caption_ids, caption_image))
    fold_size = len(segments[0][0].rows)
    return {"recall_1k_folds": metrics.mean_fold_recall(folds),
            "recall_folds": [metrics.retrieval_recall(scores, ci) for scores, ci in folds],
            "fold_size": fold_size, "scores_files": paths, "chance_r1": 100.0 / fold_size}
