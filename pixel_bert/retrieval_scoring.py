"""Scoring every image against every caption with the cross-encoder: image-text retrieval
evaluation at the paper's scale (Sec. 4.2; docs/paper.md#evaluation-protocols).

The protocol scores every image against every caption: 5M pairs for Flickr30K
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

from .distributed import DistInfo, gather_to_main, shard_range, unwrap
from .files import save_torch
from .images import ImageLoadError, pad_images
from .model import VisualTokens
from .precision import eval_autocast, eval_dtype
from .progress import Progress


class RetrievalSplit(NamedTuple):
    """An evaluation split: images (rows) and captions (columns) of the score matrix."""
    image_paths: List[str]
    image_ids: List[Union[int, str]]     # cocoid, else the file name without extension
    captions: List[str]
    caption_ids: List[int]               # Karpathy sentid
    caption_image: np.ndarray            # (n_captions,) row of each caption's image
    dataset: str                         # "coco", "flickr30k", ...


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
    # about sqrt(pairs) of each; fewer images than that (a score block, one image): more captions
    caps_per_tile = min(n_cap, max(1, pairs_per_batch // max(1, min(n_rows, math.isqrt(pairs_per_batch)))))
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
