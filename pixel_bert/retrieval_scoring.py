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
* the matrix is scored in blocks of ``images_per_block`` image rows (`pixel_bert.score_blocks`),
  each written to disk once finished, so that a killed run loses at most one block per rank and
  the same command run again scores only the blocks left, ending with the same matrix;
* under torchrun, each rank takes a contiguous run of blocks, scores them against their captions,
  and rank 0 gathers the blocks (each row exactly once: no duplicates);
* ``protocol="1k"`` scores only the five diagonal fold blocks of the COCO 1K protocol (a fifth of
  the pairs of the 5K matrix), in the same blocks;
* a progress line reports pairs done, pairs/s and the ETA of the pairs left.

The score matrix is saved with metrics.save_score_matrix; R@K with metrics.retrieval_recall and
the COCO 1K five-fold protocol with metrics.coco_1k_recall (from the 5K matrix) or
metrics.mean_fold_recall (from the fold blocks alone).
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

from .config import config_to_dict
from .distributed import DistInfo, gather_to_main, shard_range, unwrap
from .errors import UserError
from .files import save_torch
from .images import ImageLoadError, pad_images
from .model import VisualTokens
from .precision import eval_autocast, eval_dtype
from .progress import Progress
from .score_blocks import Block, BlockStore, Segment, json_digest, plan_blocks, tensor_digest

PROTOCOLS = ("5k", "1k")  # the whole matrix (COCO 5K, Flickr30K 1K) / only COCO 1K's 5 diagonal fold blocks


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


CACHE_FORMAT = 3  # valid tokens first, with their counts; CNN batches recorded (other formats are recomputed)


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

    def subset(self, local: Sequence[int]) -> "VisualCache":
        """The cache of the images at local positions ``local`` (one score block's)."""
        index = torch.as_tensor(list(local), dtype=torch.long, device=self.embeddings.device)
        return VisualCache([self.rows[i] for i in local], self.embeddings[index], self.mask[index],
                           [self.lengths[i] for i in local])


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


def _read_cache(cache_file: str, cache_key: str, paths: List[str], batches: List[List[int]], rows: List[int],
                device, log) -> Optional[VisualCache]:
    """The cache saved in ``cache_file`` when it holds these images, encoded in these CNN batches by
    the checkpoint ``cache_key``; else None (with a message when a file is there)."""
    if not os.path.isfile(cache_file):
        return None
    saved = torch.load(cache_file, map_location="cpu", weights_only=True)
    if (saved.get("format") == CACHE_FORMAT and saved.get("key") == cache_key and saved.get("paths") == paths
            and saved.get("batches") == [len(b) for b in batches]):
        log(f"visual features: {len(rows)} images from cache {cache_file}")
        return VisualCache(rows, saved["embeddings"].to(device), saved["mask"].to(device), saved["lengths"])
    log(f"visual features: cache {cache_file} is for other images, another checkpoint, other CNN batches or "
        "an older format; recomputing")
    return None


@torch.no_grad()
def encode_images(model, paths: Sequence[str], rows: Sequence[int], transform, device, batch_size: int = 64,
                  num_workers: int = 0, cache_file: Optional[str] = None, cache_key: str = "",
                  dtype: Optional[torch.dtype] = None, log=print,
                  batches: Optional[List[List[int]]] = None) -> VisualCache:
    """Run the CNN once per image of ``rows`` (indices into ``paths``) and keep its visual tokens,
    in ``dtype`` (default: the autocast dtype of evaluation, bf16/fp16 on GPU; fp32 on CPU).

    ``batches``: the CNN batches as positions into ``rows`` (default: ``batch_size`` consecutive
    rows each); an image's tokens depend on its batch's padding, so equal batches give equal tokens.
    ``cache_file``: reuse the tokens saved there when the file was written for the same rows,
    paths, batches and ``cache_key`` (the checkpoint), else compute and save them (weights_only format)."""
    rows = list(rows)
    if batches is None:
        batches = [list(range(s, min(s + batch_size, len(rows)))) for s in range(0, len(rows), batch_size)]
    cached = _read_cache(cache_file, cache_key, [paths[r] for r in rows], batches, rows, device, log) \
        if cache_file else None
    if cached is not None:
        return cached
    bert = unwrap(model).bert.eval()
    dtype = dtype or eval_dtype(device) or torch.float32
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ImageFiles(paths, transform), rows),
                                         batch_sampler=batches, num_workers=num_workers,
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
                    "batches": [len(b) for b in batches], "embeddings": embeddings.cpu(), "mask": mask.cpu(),
                    "lengths": lengths}, cache_file)
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


def protocol_segments(caption_image: np.ndarray, n_images: int, protocol: str = "5k",
                      fold_size: Optional[int] = None) -> List[Segment]:
    """The parts of the score matrix ``protocol`` needs (Sec. 4.2; docs/paper.md#evaluation-protocols):
    "5k" the whole matrix (COCO 5K; Flickr30K's 1K test is its whole matrix too); "1k" the 5
    diagonal blocks of the COCO 1K protocol: each fold of ``fold_size`` consecutive images (default
    n_images / 5, so 1,000 on COCO 5K test) against its own captions, a fifth of the 5K pairs."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    caption_image = np.asarray(caption_image)
    if protocol == "5k":
        return [Segment(range(n_images), np.arange(len(caption_image)))]
    fold = fold_size or n_images // 5
    if fold < 1 or n_images != 5 * fold:
        fix = (f"give --fold-size {n_images // 5} (or leave it out)" if n_images % 5 == 0 and n_images >= 5 else
               f"evaluate 5 x N images, e.g. --max-images {5 * max(n_images // 5, 1)}")
        raise UserError(f"--protocol 1k scores 5 folds of --fold-size consecutive images, but the split has "
                        f"{n_images} images, not 5 x {fold}: {fix}")
    return [Segment(range(lo, lo + fold), np.flatnonzero((caption_image >= lo) & (caption_image < lo + fold)))
            for lo in range(0, n_images, fold)]


def block_batches(blocks: Sequence[Block], batch_size: int) -> Tuple[List[int], List[List[int]]]:
    """(image rows, CNN batches as positions into them) of ``blocks``. No batch crosses a block: an
    image's visual tokens depend on its batch's padding, so a run that encodes only the blocks left
    gives them the tokens an uninterrupted run gives them, whatever the number of ranks."""
    rows: List[int] = []
    batches: List[List[int]] = []
    for block in blocks:
        for start in range(block.start, block.stop, batch_size):
            stop = min(start + batch_size, block.stop)
            batches.append(list(range(len(rows), len(rows) + stop - start)))
            rows.extend(range(start, stop))
    return rows, batches


def open_block_store(root: str, model, split: RetrievalSplit, text, segments: Sequence[Segment], protocol: str,
                     checkpoint: Optional[str], info: DistInfo, log=print) -> BlockStore:
    """The store of this evaluation's score blocks under ``root``, fingerprinted by the model's
    weights and config, the split, the caption tokens and the protocol (`pixel_bert.score_blocks`).
    Rank 0 says which folders beside it hold blocks of other runs, and describes its own."""
    inner = unwrap(model)
    parts = {"model": json_digest([tensor_digest(inner.state_dict().items()), config_to_dict(inner.config)]),
             "split": json_digest([split.dataset, split.image_paths, [str(i) for i in split.image_ids],
                                   [str(c) for c in split.caption_ids], split.caption_image.tolist()]),
             "text": tensor_digest([("input_ids", text.input_ids), ("attention_mask", text.attention_mask)]),
             "protocol": json_digest([protocol] + [[s.rows.start, s.rows.stop, s.columns.tolist()] for s in segments])}
    about = {"checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "dataset": split.dataset,
             "n_images": len(split.image_paths), "n_captions": len(split.captions),
             "tokens_per_caption": int(text.input_ids.shape[1]), "protocol": protocol,
             "fold_size": len(segments[0].rows) if protocol == "1k" else None}
    store = BlockStore(root, protocol, parts, about)
    if info.is_main:
        for line in store.other_folders():
            log(line)
        store.describe()
    return store


def _encode_blocks(model, split: RetrievalSplit, blocks: Sequence[Block], transform, info: DistInfo, batch_size: int,
                   num_workers: int, feature_cache: Optional[str], checkpoint: Optional[str], protocol: str,
                   log) -> VisualCache:
    """The visual tokens of the images of ``blocks`` (`encode_images`, batches within blocks)."""
    rows, batches = block_batches(blocks, batch_size)
    cache_file = (os.path.join(feature_cache, f"visual_{len(split.image_paths)}img_{protocol}_rank{info.rank}of"
                               f"{info.world_size}.pt") if feature_cache else None)
    return encode_images(model, split.image_paths, rows, transform, info.device, batch_size, num_workers,
                         cache_file, _cache_key(checkpoint), log=log if info.is_main else (lambda *_: None),
                         batches=batches)


def _score_blocks(model, cache: VisualCache, blocks: Sequence[Block], segments: Sequence[Segment], text, device,
                  pairs_per_batch: int, progress: Progress, store: Optional[BlockStore]) -> Dict[Block, np.ndarray]:
    """Score each block against its segment's captions (`score_rows`), writing it once finished."""
    position = {row: i for i, row in enumerate(cache.rows)}
    captions: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    out = {}
    for block in blocks:
        if block.segment not in captions:  # one copy of a segment's caption tokens
            columns = torch.as_tensor(segments[block.segment].columns, dtype=torch.long)
            captions[block.segment] = (text.input_ids[columns], text.attention_mask[columns])
        images = cache.subset([position[row] for row in range(block.start, block.stop)])
        out[block] = score_rows(model, images, *captions[block.segment], device, pairs_per_batch, progress).numpy()
        if store is not None:
            store.remove_interrupted_write(block)
            store.save(block, out[block])
    return out


def evaluate_retrieval(model, split: RetrievalSplit, tokenizer, transform, max_text_len: int, info: DistInfo,
                       image_batch_size: int = 64, pairs_per_batch: int = 1024, num_workers: int = 0,
                       feature_cache: Optional[str] = None, checkpoint: Optional[str] = None,
                       log=print, protocol: str = "5k", fold_size: Optional[int] = None,
                       blocks_dir: Optional[str] = None, images_per_block: int = 16) -> Optional[Dict[str, Any]]:
    """Score the parts of the (images x captions) matrix of ``split`` that ``protocol`` needs
    (`protocol_segments`: "5k" all of it, "1k" the COCO 1K fold blocks; Sec. 4.2), in blocks of
    ``images_per_block`` image rows, a contiguous run of blocks per rank.

    Returns, on rank 0, ``dict(scores, segments, stats)``: ``segments`` the list of (Segment, its
    scores as float32 numpy), ``scores`` the whole (n_images, n_captions) matrix under "5k" (None
    under "1k"); None on the other ranks. ``feature_cache``: a folder where each rank keeps its
    images' visual tokens. ``blocks_dir``: a folder where each finished block is written, and from
    which the same evaluation run again takes the blocks already scored (`pixel_bert.score_blocks`);
    None keeps them in memory only."""
    segments = protocol_segments(split.caption_image, len(split.image_paths), protocol, fold_size)
    blocks = plan_blocks(segments, images_per_block)
    mine = [blocks[i] for i in shard_range(len(blocks), info)]
    text = tokenizer(split.captions, max_length=max_text_len)  # tokenised once, for all pairs
    store = open_block_store(blocks_dir, model, split, text, segments, protocol, checkpoint, info, log) \
        if blocks_dir else None
    found = {b: store.load(b, len(segments[b.segment].columns)) for b in mine} if store is not None else {}
    done = {b: scores for b, scores in found.items() if scores is not None}
    todo = [b for b in mine if b not in done]
    pairs = {b: (b.stop - b.start) * len(segments[b.segment].columns) for b in mine}
    if done and info.is_main:
        log(f"retrieval eval: {len(done)} of rank 0's {len(mine)} score blocks already scored in {store.folder}; "
            f"scoring the other {len(todo)}")
    t0 = time.time()
    cache = _encode_blocks(model, split, mine if feature_cache else todo, transform, info, image_batch_size,
                           num_workers, feature_cache, checkpoint, protocol, log) if todo else None
    cnn_seconds = time.time() - t0
    # only the pairs left count in the rate and the ETA (a resumed run's reused blocks are "done")
    progress = Progress(sum(pairs.values()), "pairs", info, label=f"retrieval eval (rank 0 of {info.world_size}): ",
                        done=sum(pairs[b] for b in done))
    t1 = time.time()
    if todo:
        done.update(_score_blocks(model, cache, todo, segments, text, info.device, pairs_per_batch, progress, store))
    progress.update(0, force=True)
    mine_out = dict(blocks=[(b, done[b]) for b in mine], blocks_scored=len(todo),
                    pairs_scored=sum(pairs[b] for b in todo), cnn_seconds=cnn_seconds, score_seconds=time.time() - t1)
    gathered = gather_to_main(mine_out, info)
    if gathered is None:
        return None
    return _assemble(gathered, segments, split, protocol, len(blocks), info, store.folder if store else None)


def _assemble(gathered: List[Dict[str, Any]], segments: Sequence[Segment], split: RetrievalSplit, protocol: str,
              n_blocks: int, info: DistInfo, folder: Optional[str]) -> Dict[str, Any]:
    """Rank 0: every rank's blocks put in their segments' score arrays (each row exactly once), and the stats."""
    n_images = len(split.image_paths)
    parts = [np.full((len(s.rows), len(s.columns)), np.nan, dtype=np.float32) for s in segments]
    filled = np.zeros(n_images, dtype=np.int64)
    for rank_out in gathered:
        for block, scores in rank_out["blocks"]:
            first = segments[block.segment].rows.start
            parts[block.segment][block.start - first:block.stop - first] = scores
            filled[block.start:block.stop] += 1
    if not (filled == 1).all():  # every row from exactly one rank
        raise RuntimeError(f"retrieval gather: rows covered {np.bincount(filled)} times; sharding is broken")
    scored = sum(g["pairs_scored"] for g in gathered)
    score_seconds = max(g["score_seconds"] for g in gathered)
    stats = dict(n_images=n_images, n_captions=len(split.captions), protocol=protocol,
                 pairs=sum(p.size for p in parts), pairs_scored=scored, blocks=n_blocks,
                 blocks_reused=n_blocks - sum(g["blocks_scored"] for g in gathered),
                 cnn_seconds=max(g["cnn_seconds"] for g in gathered), score_seconds=score_seconds,
                 pairs_per_second=scored / max(score_seconds, 1e-9), world_size=info.world_size, score_blocks=folder)
    return dict(scores=parts[0] if protocol == "5k" else None, segments=list(zip(segments, parts)), stats=stats)
