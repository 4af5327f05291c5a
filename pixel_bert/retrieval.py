"""Image-text retrieval: ranking fine-tuning with hard negatives, and a scalable evaluation
(Sec. 4.2 of the paper; docs/paper.md#evaluation-protocols).

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
   flow through the positive and the 5 hard negatives only (TaskConfig.retrieval_loss).

The CNN is frozen (TrainConfig.freeze_backbone, set by the retrieval presets; finetune.py calls
PixelBert.freeze_backbone); the visual projection and s_v of eq. (5) still train unless
TrainConfig.freeze_visual_proj.

Evaluation (see docs/paper.md) must score every image against every caption: 5M pairs for Flickr30K
1K x 5K, 125M for COCO 5K x 25K. So:

* the CNN runs once per image: `encode_images` keeps each image's visual tokens (eq. 5) in a
  cache, in the autocast dtype, valid tokens first, optionally saved to disk and reused by later
  runs of the same checkpoint;
* captions are tokenised once; pairs are scored in tiles of images x captions of about
  ``pairs_per_batch`` pairs, images sorted by their count of valid visual tokens and captions by
  length, so that a tile holds little or no padding; under autocast on GPU, with no host work per
  pair and the scores kept on the device until the end (`score_rows`);
* under torchrun, each rank takes a contiguous block of image rows, scores them against all
  captions, and rank 0 gathers the blocks (each row exactly once: no duplicates);
* a progress line reports pairs done, pairs/s and the ETA.

The score matrix is saved with metrics.save_score_matrix; R@K with metrics.retrieval_recall and
the COCO 1K five-fold protocol with metrics.coco_1k_recall.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import metrics
from .annotations import AnnotationError, json_field, json_list, karpathy_images
from .distributed import DistInfo, gather_to_main, shard_range, unwrap
from .files import save_torch
from .images import ImageLoadError, pad_images
from .losses import hard_negative_loss
from .model import VisualTokens
from .precision import eval_autocast, eval_dtype
from .progress import Progress

# -------------------------------------------------------------------------------------------------
#                                          Data
# -------------------------------------------------------------------------------------------------


class RetrievalSplit(NamedTuple):
    """An evaluation split: images (rows) and captions (columns) of the score matrix."""
    image_paths: List[str]
    image_ids: List[Union[int, str]]     # cocoid, else the file name without extension
    captions: List[str]
    caption_ids: List[int]               # Karpathy sentid
    caption_image: np.ndarray            # (n_captions,) row of each caption's image
    dataset: str                         # "coco", "flickr30k", ...


def read_karpathy_eval(dataset_json: str, image_root: str, split: str = "test",
                       max_images: Optional[int] = None, max_captions: Optional[int] = None) -> RetrievalSplit:
    """The ``split`` ("val" or "test") of Karpathy's dataset_coco.json / dataset_flickr30k.json, in
    file order: COCO test = 5,000 images (the 5K set; its consecutive thousands are the 1K folds),
    Flickr30K test = 1,000 images. ``max_images`` keeps the first N images, ``max_captions`` at
    most that many captions per image (quick runs). Image paths as data.read_karpathy."""
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
            caption_ids.append(json_field(s, "sentid", int, w, path) if "sentid" in s else len(caption_ids))
            caption_image.append(row)
    if len({type(x) for x in image_ids}) > 1:  # a mix of int and str ids: store all as str
        image_ids = [str(x) for x in image_ids]
    return RetrievalSplit(paths, image_ids, captions, caption_ids, np.asarray(caption_image, dtype=np.int64),
                          dataset)


class ImageFiles(torch.utils.data.Dataset):
    """Images by path, transformed; a bad image comes back as its ImageLoadError, so that one pass
    names every bad file (a score matrix cannot skip a row: `encode_images` then refuses)."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform.load(self.paths[index])
        except ImageLoadError as e:
            return index, e


def collate_images(samples, size_divisor: int = 1):
    """(indices, images, pixel_mask, errors) of the readable images, and the errors of the others."""
    good = [s for s in samples if torch.is_tensor(s[1])]
    errors = [s[1] for s in samples if not torch.is_tensor(s[1])]
    images, pixel_mask = pad_images([s[1] for s in good], size_divisor) if good else (None, None)
    return torch.tensor([s[0] for s in good], dtype=torch.long), images, pixel_mask, errors


def unreadable_images_error(errors: Sequence[ImageLoadError], total: int, shown: int = 10) -> ImageLoadError:
    """One error naming every unreadable image (the first ``shown`` in full)."""
    more = f"; and {len(errors) - shown} more" if len(errors) > shown else ""
    return ImageLoadError(f"{len(errors)} of {total} evaluation images cannot be read, and retrieval scores every "
                          f"image against every caption, so none may be missing: "
                          f"{'; '.join(str(e) for e in errors[:shown])}{more}. Restore these files or point "
                          f"--retrieval-images at the folder that holds them", errors[0].path, errors[0].reason)


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


def negative_pairs(image_keys: Sequence[str], num_negatives: int, kind: str = "both",
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image rows, caption rows), each (B, 1 + num_negatives): column 0 is the positive (i, i),
    then the caption negatives (i, j) and the image negatives (j, i) (module docstring)."""
    B = len(image_keys)
    n_cap = {"both": num_negatives // 2, "captions": num_negatives, "images": 0}[kind]
    n_img = num_negatives - n_cap
    others = sample_negatives(image_keys, num_negatives, generator)          # (B, N)
    own = torch.arange(B)[:, None]
    img_rows = torch.cat([own, own.expand(B, n_cap), others[:, n_cap:]], dim=1)
    cap_rows = torch.cat([own, others[:, :n_cap], own.expand(B, n_img)], dim=1)
    return img_rows, cap_rows


ITM_TO_RETRIEVAL = {"itm.classifier.weight": "retrieval.score.weight", "itm.classifier.bias": "retrieval.score.bias"}


def itm_as_retrieval_head(state: Dict[str, torch.Tensor], log=print) -> Dict[str, torch.Tensor]:
    """A copy of a pre-training state dict whose ITM classifier (eq. 8's linear layer) also serves
    as the retrieval score layer (TaskConfig.retrieval_head_from_itm): the ITM logit already
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

CACHE_FORMAT = 2  # valid visual tokens first, with their counts (files of other formats are recomputed)


@dataclass
class VisualCache:
    """Visual tokens of some images: embeddings (n, K, H) and mask (n, K) with each image's valid
    tokens first, ``lengths`` (n,) their counts (on the host), ``rows`` the global image indices.

    Putting valid tokens first changes no score: visual tokens carry no position (eq. 1), and the
    [CLS] output does not depend on the order of the tokens it attends to. It lets a batch of images
    be cut to its longest image's valid count instead of the padded grid of the CNN batch."""
    rows: List[int]
    embeddings: torch.Tensor
    mask: torch.Tensor
    lengths: List[int]

    def select(self, local: torch.Tensor, length: int) -> VisualTokens:
        """VisualTokens for local rows ``local`` (P,), cut to ``length`` tokens (their longest)."""
        emb = self.embeddings[local, :length]
        positions = torch.arange(length, device=emb.device).expand(len(local), -1)
        return VisualTokens(emb, self.mask[local, :length], positions, (1, length))


def valid_tokens_first(visual: VisualTokens) -> Tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, mask) of ``visual`` with each image's valid tokens moved to the front (stable)."""
    order = visual.mask.int().argsort(dim=1, descending=True, stable=True)      # (B, K)
    embeddings = visual.embeddings.gather(1, order[..., None].expand_as(visual.embeddings))
    return embeddings, visual.mask.gather(1, order)


def _cache_key(checkpoint: Optional[str]) -> str:
    if checkpoint and os.path.isdir(checkpoint):  # a model folder: its weights file identifies it
        checkpoint = os.path.join(checkpoint, "model.safetensors")
    if checkpoint and os.path.isfile(checkpoint):
        st = os.stat(checkpoint)
        return f"{os.path.abspath(checkpoint)}:{st.st_size}:{int(st.st_mtime)}"
    return ""


@torch.no_grad()
def encode_images(model, paths: Sequence[str], rows: Sequence[int], transform, device, batch_size: int = 64,
                  num_workers: int = 0, cache_file: Optional[str] = None, cache_key: str = "",
                  dtype: Optional[torch.dtype] = None, log=print) -> VisualCache:
    """Run the CNN once per image of ``rows`` (indices into ``paths``) and keep its visual tokens,
    in ``dtype`` (default: the autocast dtype of evaluation, bf16/fp16 on GPU; fp32 on CPU).

    ``cache_file``: reuse the tokens saved there when the file was written for the same rows,
    paths and ``cache_key`` (the checkpoint), else compute and save them (weights_only format)."""
    rows = list(rows)
    if cache_file and os.path.isfile(cache_file):
        saved = torch.load(cache_file, map_location="cpu", weights_only=True)
        if (saved.get("format") == CACHE_FORMAT and saved.get("key") == cache_key
                and saved.get("paths") == [paths[r] for r in rows]):
            log(f"visual features: {len(rows)} images from cache {cache_file}")
            return VisualCache(rows, saved["embeddings"].to(device), saved["mask"].to(device), saved["lengths"])
        log(f"visual features: cache {cache_file} is for other images, another checkpoint or an older "
            "format; recomputing")
    bert = unwrap(model).bert.eval()
    dtype = dtype or eval_dtype(device) or torch.float32
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ImageFiles(paths, transform), rows),
                                         batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=functools.partial(collate_images,
                                                                      size_divisor=bert.config.feature_stride))
    embs, masks, errors = [], [], []
    for _, images, pixel_mask, bad in loader:
        errors += bad
        if errors:  # the pass goes on only to name every bad file
            continue
        with eval_autocast(device):
            e, m = valid_tokens_first(bert.encode_image(images.to(device), pixel_mask.to(device)))
        embs.append(e.to(dtype))
        masks.append(m)
    if errors:
        raise unreadable_images_error(errors, len(rows))
    lengths = torch.cat([m.sum(1) for m in masks]).tolist() if masks else []  # one copy to the host
    K = max(max(lengths, default=1), 1)  # only valid tokens are kept: the padded grid's tail goes
    H = embs[0].shape[2] if embs else bert.config.hidden_size
    embeddings = torch.zeros(len(rows), K, H, dtype=dtype, device=device)
    mask = torch.zeros(len(rows), K, dtype=torch.bool, device=device)
    start = 0
    for e, m in zip(embs, masks):  # one copy per image batch (grids may differ between batches)
        k = min(K, e.shape[1])
        embeddings[start:start + len(e), :k] = e[:, :k]
        mask[start:start + len(e), :k] = m[:, :k]
        start += len(e)
    if cache_file:
        save_torch({"format": CACHE_FORMAT, "key": cache_key, "paths": [paths[r] for r in rows],
                    "embeddings": embeddings.cpu(), "mask": mask.cpu(), "lengths": lengths}, cache_file)
    return VisualCache(rows, embeddings, mask, lengths)


@torch.no_grad()
def score_rows(model, cache: VisualCache, input_ids: torch.Tensor, attention_mask: torch.Tensor, device,
               pairs_per_batch: int = 1024, progress: Optional[Progress] = None) -> torch.Tensor:
    """Scores (len(cache.rows), n_captions) of every cached image against every caption.

    Pairs go through the model in tiles of about ``pairs_per_batch``: a block of images times a block
    of captions, images sorted by their count of valid visual tokens and captions by length. A
    tile's images then have (nearly) the same token count and its captions the same length: the
    tile is cut to its longest of each and holds little padding, often none (attention then runs
    without a mask). Every length is known on the host beforehand, so the loop does no host work
    per pair and never waits for the device; the scores stay on the device until the end."""
    model.eval()  # the wrapper itself, so that a torch.compile'd model runs compiled
    n_rows, n_cap = len(cache.rows), len(input_ids)
    text_lengths = attention_mask.sum(1).cpu()                                   # (n_cap,)
    image_lengths = torch.tensor(cache.lengths, dtype=torch.long)               # (n_rows,)
    caption_order, image_order = text_lengths.argsort(stable=True), image_lengths.argsort(stable=True)
    caps_per_tile = min(n_cap, max(1, math.isqrt(pairs_per_batch)))
    imgs_per_tile = min(n_rows, max(1, pairs_per_batch // caps_per_tile))
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    caption_order_dev, image_order_dev = caption_order.to(device), image_order.to(device)
    scores = torch.empty(n_rows, n_cap, dtype=torch.float32, device=device)
    for i in range(0, n_rows, imgs_per_tile):
        img = image_order_dev[i:i + imgs_per_tile]
        k = max(int(image_lengths[image_order[i:i + imgs_per_tile]].max()), 1)
        visual = cache.select(img, k)
        for j in range(0, n_cap, caps_per_tile):
            cap = caption_order_dev[j:j + caps_per_tile]
            t = int(text_lengths[caption_order[j:j + caps_per_tile]].max())
            # every image of the tile with every caption: images repeated, captions tiled
            pair_image = torch.arange(len(img), device=device).repeat_interleave(len(cap))
            with eval_autocast(device):
                s = model(input_ids[cap, :t].repeat(len(img), 1), attention_mask[cap, :t].repeat(len(img), 1),
                          visual=visual[pair_image])
            scores[img[:, None], cap[None, :]] = s.float().view(len(img), len(cap))
            if progress is not None:
                progress.update(len(img) * len(cap))
    return scores.cpu()


@torch.no_grad()
def score_pairs_uncached(model, images: torch.Tensor, pixel_mask: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, device, pairs_per_batch: int = 64) -> torch.Tensor:
    """The naive baseline: every pair runs the CNN on its image again (which docs/paper.md
    warns against). For the equivalence test and the throughput benchmark only."""
    model = unwrap(model).eval()
    n_img, n_cap = len(images), len(input_ids)
    out = torch.empty(n_img * n_cap)
    for start in range(0, n_img * n_cap, pairs_per_batch):
        pair = torch.arange(start, min(start + pairs_per_batch, n_img * n_cap))
        rows, cols = pair // n_cap, pair % n_cap
        with eval_autocast(device):
            s = model(input_ids[cols].to(device), attention_mask[cols].to(device), images[rows].to(device),
                      pixel_mask[rows].to(device))
        out[start:start + len(pair)] = s.float().cpu()
    return out.view(n_img, n_cap)


def evaluate_retrieval(model, split: RetrievalSplit, tokenizer, transform, max_text_len: int, info: DistInfo,
                       image_batch_size: int = 64, pairs_per_batch: int = 1024, num_workers: int = 0,
                       feature_cache: Optional[str] = None, checkpoint: Optional[str] = None,
                       log=print) -> Optional[Dict[str, Any]]:
    """Score the full (images x captions) matrix of ``split``, sharded by image rows across ranks.

    Returns, on rank 0, ``dict(scores (n_images, n_captions) float32 numpy, stats)`` (None on the
    other ranks). ``feature_cache``: a folder where each rank keeps its images' visual tokens."""
    device = info.device
    rows = list(shard_range(len(split.image_paths), info))
    t0 = time.time()
    cache_file = (os.path.join(feature_cache, f"visual_{len(split.image_paths)}img_rank{info.rank}of"
                               f"{info.world_size}.pt") if feature_cache else None)
    cache = encode_images(model, split.image_paths, rows, transform, device, image_batch_size, num_workers,
                          cache_file, _cache_key(checkpoint), log=log if info.is_main else (lambda *_: None))
    cnn_seconds = time.time() - t0
    text = tokenizer(split.captions, max_length=max_text_len)  # tokenised once, for all pairs
    total = len(rows) * len(split.captions)
    progress = Progress(total, "pairs", info, label=f"retrieval eval (rank 0 of {info.world_size}): ")
    t1 = time.time()
    block = score_rows(model, cache, text.input_ids, text.attention_mask, device, pairs_per_batch, progress)
    progress.update(0, force=True)
    score_seconds = time.time() - t1
    gathered = gather_to_main((rows, block.numpy(), score_seconds), info)
    if gathered is None:
        return None
    scores = np.full((len(split.image_paths), len(split.captions)), np.nan, dtype=np.float32)
    filled = np.zeros(len(split.image_paths), dtype=np.int64)
    for part_rows, part, _ in gathered:
        scores[part_rows] = part
        filled[part_rows] += 1
    if not (filled == 1).all():  # every row from exactly one rank
        raise RuntimeError(f"retrieval gather: rows covered {np.bincount(filled)} times; sharding is broken")
    n_pairs = scores.size
    stats = dict(n_images=len(split.image_paths), n_captions=len(split.captions), pairs=n_pairs,
                 cnn_seconds=cnn_seconds, score_seconds=max(p[2] for p in gathered),
                 pairs_per_second=n_pairs / max(max(p[2] for p in gathered), 1e-9), world_size=info.world_size)
    return dict(scores=scores, stats=stats)


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray, fold_size: int = 1000) -> Dict[str, Any]:
    """R@1/5/10 both ways on the whole matrix (COCO 5K, Flickr30K 1K), plus the COCO 1K protocol
    (mean over 5 folds of ``fold_size`` images) when the matrix has exactly 5 folds of images."""
    out: Dict[str, Any] = {"recall": metrics.retrieval_recall(scores, caption_image)}
    if scores.shape[0] == 5 * fold_size:
        out["recall_1k_folds"] = metrics.coco_1k_recall(scores, caption_image, n_folds=5, fold_size=fold_size)
    return out
