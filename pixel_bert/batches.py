"""Caption datasets and batching for pre-training (Sec. 3.2 and 4.1 of the paper; docs/paper.md).

The pipeline, in the order data flows through it:

1. Readers (`pixel_bert.annotations`) turn the annotation files *as distributed*
   (docs/paper.md#data-formats) into a flat list of `CaptionRecord(image_path, caption, image_key)`: `read_coco_captions`, `read_karpathy`,
   `read_visual_genome`, and `build_pretrain_records` for the paper's pre-training mix (Sec. 4.1:
   COCO Karpathy train + restval, Visual Genome minus the COCO Karpathy val/test images).
2. `CaptionDataset` loads one image (`pixel_bert.images.load_image`: any Pillow mode -> RGB, EXIF
   orientation applied, decompression bombs refused), resizes it with `ImageTransform` (keep the aspect
   ratio, short side 800 / long side at most 1333 for R50, Sec. 4.1) and returns a dict. A bad
   sample (missing or corrupt file, empty caption) becomes a `BadSample` (`pixel_bert.bad_samples`).
3. `CaptionCollator` drops the `BadSample` entries, pads the images to the batch's largest size
   (`pad_images`, with a pixel mask so padded feature pixels can be masked out of attention and
   out of pixel sampling, docs/paper.md#model-architecture) and tokenises the captions.
4. `GroupedBatchSampler` (with `aspect_ratio_group_ids`) batches images of similar aspect ratio
   together so that little of each batch is padding.
"""
from __future__ import annotations

import bisect
import collections
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from .annotations import CaptionRecord
from .bad_samples import BadSample, BadSampleError, drop_bad_samples
from .images import MAX_IMAGE_PIXELS, ImageLoadError, ImageTransform, pad_images, read_image_size


# ------------------------------------------------------------------------------------------------
# Dataset and collate
# ------------------------------------------------------------------------------------------------

class CaptionDataset(Dataset):
    """(image, caption) pairs from `CaptionRecord`s.

    ``dataset[i]`` is ``dict(image=Tensor(3, h, w), caption=str, image_key=str, index=i)``, or a
    `BadSample` for a bad sample (missing file, truncated/corrupt/oversized image, empty caption) so
    that one broken file among millions does not stop a run. `CaptionCollator` drops it and carries
    it in the batch (``num_bad``, ``bad_samples``) to the training loop, which warns and counts
    (module docstring). With ``fatal_bad_samples=True`` (TrainConfig.fatal_bad_samples) a bad
    sample raises instead.
    """

    def __init__(self, records: Sequence[CaptionRecord], transform: ImageTransform,
                 fatal_bad_samples: bool = False, max_pixels: int = MAX_IMAGE_PIXELS):
        self.records = records
        self.transform = transform
        self.fatal_bad_samples = fatal_bad_samples
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Union[Dict[str, Any], BadSample]:
        record = self.records[index]
        if not record.caption.strip():
            message = (f"record {index} (image {record.image_path}, key {record.image_key}) has an empty "
                       "caption; fix or drop it in the annotation file")
            if self.fatal_bad_samples:
                raise BadSampleError(message + " (fatal_bad_samples=True; set it False to skip bad samples)")
            return BadSample(record.image_path, "empty_caption", message)
        try:
            image = self.transform.load(record.image_path, max_pixels=self.max_pixels)
        except ImageLoadError as err:
            if self.fatal_bad_samples:
                raise
            return BadSample.from_error(err)
        return dict(image=image, caption=record.caption, image_key=record.image_key, index=index)


class CaptionCollator:
    """``collate_fn`` for a DataLoader over `CaptionDataset` or `pixel_bert.synthetic.SyntheticCaptions`.

    Drops `BadSample` entries (`drop_bad_samples`), pads images (`pad_images`) and tokenises captions
    with ``tokenizer(captions, max_length=max_text_len)`` (a `pixel_bert.tokenizer.WordPieceTokenizer`).
    Returns a dict:

    - ``images`` float (B, 3, H, W), ``pixel_mask`` bool (B, H, W), True on real pixels;
    - ``input_ids`` long (B, T), ``attention_mask`` bool (B, T), True on real tokens;
    - ``image_keys``, ``captions``: lists of B strings; ``indices``: long (B,) dataset indices;
    - ``num_samples``: B; ``num_bad``: how many samples of this batch were bad and dropped, and
      ``bad_samples``: their `BadSample` tuples. The training loop sums the first over the epoch and
      warns about the second: they are how bad samples cross from worker processes.

    If every sample was bad, B is 0 (tensors with a zero batch dimension). A training loop should
    skip the forward pass for such a batch, or under DDP run a zero-loss step so ranks stay in step.
    """

    def __init__(self, tokenizer, max_text_len: int, size_divisor: int = 1):
        """``size_divisor``: pad to a multiple of the model's feature stride (`feature_stride` of the
        model config), so every feature cell covers whole input pixels."""
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.size_divisor = size_divisor

    def __call__(self, samples: Sequence[Union[Dict[str, Any], BadSample]]) -> Dict[str, Any]:
        good, bad = drop_bad_samples(samples)
        if not good:
            return dict(images=torch.zeros((0, 3, 0, 0)), pixel_mask=torch.zeros((0, 0, 0), dtype=torch.bool),
                        input_ids=torch.zeros((0, 0), dtype=torch.long),
                        attention_mask=torch.zeros((0, 0), dtype=torch.bool),
                        image_keys=[], captions=[], indices=torch.zeros((0,), dtype=torch.long),
                        num_samples=0, **bad)
        images, pixel_mask = pad_images([s["image"] for s in good], self.size_divisor)
        captions = [s["caption"] for s in good]
        text = self.tokenizer(captions, max_length=self.max_text_len)
        return dict(images=images, pixel_mask=pixel_mask,
                    input_ids=text.input_ids, attention_mask=text.attention_mask,
                    image_keys=[s["image_key"] for s in good], captions=captions,
                    indices=torch.tensor([s["index"] for s in good], dtype=torch.long),
                    num_samples=len(good), **bad)


# ------------------------------------------------------------------------------------------------
# Aspect-ratio grouping
# ------------------------------------------------------------------------------------------------

def aspect_ratio_group_ids(records_or_sizes: Sequence[Union[CaptionRecord, Tuple[int, int]]],
                           group_factor: int = 3) -> List[int]:
    """A group id per dataset item from its aspect ratio (width / height), for `GroupedBatchSampler`.

    Items are `CaptionRecord`s or (width, height) pairs. A record's ``size`` is used when known
    (COCO and VG annotations give it); otherwise the image header is read (`read_image_size`,
    once per distinct file). A file that cannot be opened gets ratio 1; the dataset reports it
    later as a bad sample. Bin edges are ``2 ** linspace(-1, 1, 2 * group_factor + 1)`` (ratios
    1/2 .. 2), as in torchvision's detection references, giving ``2 * group_factor + 2`` groups
    whose ids increase with the ratio (so neighbouring ids are similar shapes).
    """
    edges = (2.0 ** np.linspace(-1, 1, 2 * group_factor + 1)).tolist() if group_factor > 0 else [1.0]
    header_cache: Dict[str, Tuple[int, int]] = {}
    group_ids = []
    for i, item in enumerate(records_or_sizes):
        if isinstance(item, CaptionRecord):
            size = item.size
            if size is None:
                if item.image_path not in header_cache:
                    try:
                        header_cache[item.image_path] = read_image_size(item.image_path)
                    except Exception:  # noqa: BLE001 - unreadable: group it anywhere, the dataset reports it
                        header_cache[item.image_path] = (1, 1)
                size = header_cache[item.image_path]
        else:
            size = item
        try:
            width, height = size
        except (TypeError, ValueError):
            raise ValueError(f"aspect_ratio_group_ids: item {i} is {item!r:.60}; expected a CaptionRecord "
                             "or a (width, height) pair") from None
        ratio = width / height if height > 0 else 1.0
        group_ids.append(bisect.bisect_right(edges, ratio))
    return group_ids


class GroupedBatchSampler(Sampler[List[int]]):
    """Batches whose images share an aspect-ratio group, to cut padding (as torchvision's detection
    references do). Wraps any index sampler, including `DistributedSampler`:

        sampler = DistributedSampler(dataset, shuffle=True)   # or RandomSampler(dataset)
        batches = GroupedBatchSampler(sampler, aspect_ratio_group_ids(records), batch_size)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=CaptionCollator(...))
        for epoch ...: batches.set_epoch(epoch)

    Indices are taken in the sampler's order and buffered per group; a batch is yielded as soon as
    its group's buffer is full. At the end of the epoch the leftovers (fewer than ``batch_size`` in
    each group) are concatenated in group order (neighbouring ratios together) and cut into
    batches. So every index the sampler gives appears exactly once, except that with ``drop_last``
    (the default) the last ``len(sampler) % batch_size`` leftovers are dropped.

    Equal steps on every rank (DDP): the number of batches depends only on ``len(sampler)``, never
    on which groups the indices fall in: ``len(sampler) // batch_size`` with ``drop_last``, else
    ``ceil(len(sampler) / batch_size)`` (the last batch then is short). `DistributedSampler` gives
    every rank the same ``len(sampler)`` (it pads with repeated indices), so every rank runs the
    same number of steps per epoch and no rank waits forever in an all-reduce.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int,
                 drop_last: bool = True):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"GroupedBatchSampler: batch_size must be a positive int, got {batch_size!r}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        """Forward to the wrapped sampler (DistributedSampler reshuffles by epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[List[int]]:
        buffers: Dict[int, List[int]] = collections.defaultdict(list)
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        leftovers = [index for group in sorted(buffers) for index in buffers[group]]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start: start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                break
            yield batch

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)


def epoch_batch_sampler(dataset: Dataset, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                        groups: Optional[Sequence[int]] = None):
    """``make_batch_sampler(epoch)`` for `pixel_bert.trainer.Trainer`: this rank's share of the
    dataset, shuffled per epoch with the same permutation on every rank (``drop_last``, so every rank
    takes the same number of steps), in batches of ``batch_size``; grouped by aspect ratio when
    ``groups`` (`aspect_ratio_group_ids`) are given."""
    def make(epoch: int):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        if groups is not None:
            return GroupedBatchSampler(sampler, groups, batch_size)
        return BatchSampler(sampler, batch_size, drop_last=True)
    return make
