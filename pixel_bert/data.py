"""Images, caption datasets and batching for pre-training (Sec. 3.2 and 4.1 of the paper; docs/paper.md).

The pipeline, in the order data flows through it:

1. Readers turn the annotation files *as distributed* (docs/paper.md#data-formats) into a flat list of
   `CaptionRecord(image_path, caption, image_key)`: `read_coco_captions`, `read_karpathy`,
   `read_visual_genome`, and `build_pretrain_records` for the paper's pre-training mix (Sec. 4.1:
   COCO Karpathy train + restval, Visual Genome minus the COCO Karpathy val/test images).
2. `CaptionDataset` loads one image (`load_image`: any Pillow mode -> RGB, EXIF orientation
   applied, decompression bombs refused), resizes it with `ImageTransform` (keep the aspect
   ratio, short side 800 / long side at most 1333 for R50, Sec. 4.1) and returns a dict. A bad
   sample (missing or corrupt file, empty caption) becomes a `BadSample(path, reason, message)`.
3. `CaptionCollator` drops the `BadSample` entries, pads the images to the batch's largest size
   (`pad_images`, with a pixel mask so padded feature pixels can be masked out of attention and
   out of pixel sampling, docs/paper.md#model-architecture) and tokenises the captions.
4. `GroupedBatchSampler` (with `aspect_ratio_group_ids`) batches images of similar aspect ratio
   together so that little of each batch is padding.

Bad samples across DataLoader workers
-------------------------------------
Datasets run inside DataLoader worker processes, each with its own memory, so nothing a dataset
counts or remembers there reaches the training loop, and a warning printed there would repeat in
every worker and every epoch. A bad sample therefore travels *in the batch*: the dataset returns a
`BadSample`, the collator (`drop_bad_samples`, also in the worker) drops it and puts
``batch["num_bad"]`` and ``batch["bad_samples"]`` into the batch, and the process that reads the
batches (`pixel_bert.engine.Trainer`, `pixel_bert.downstream.predict_sharded`) hands them to one
`BadSampleReporter`, which warns once per file for the whole run and counts every occurrence. The
Trainer sums ``num_bad`` over the epoch (under DDP all-reduced) for its summary line, and stops the
run when too large a share of an epoch is bad, naming the first bad files.
"""
from __future__ import annotations

import bisect
import collections
import json
import math
import os
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from .config import IMAGE_FORMATS

# Largest image (width x height) we agree to decode: Pillow's own default, about 89.5M pixels
# (a 1 GB RGBA buffer / 4 / 3). The biggest COCO / VG images are around 1M pixels, so anything
# near this limit is a broken or hostile file ("decompression bomb"): a few KB of PNG can declare
# a 50,000 x 50,000 image and exhaust the memory of every DataLoader worker.
MAX_IMAGE_PIXELS = 89_478_485

# Transparent pixels are composited onto WHITE. Transparent images in web-scraped data are mostly
# logos, drawings and cut-outs made to be shown on a light page; dark strokes on a transparent
# background would vanish on black. (Pillow's plain convert("RGB") just drops alpha, exposing
# whatever colour the invisible pixels happen to store.)
ALPHA_BACKGROUND = (255, 255, 255)


# ------------------------------------------------------------------------------------------------
# Image loading
# ------------------------------------------------------------------------------------------------

class ImageLoadError(ValueError):
    """An image file could not be turned into an RGB image. ``path`` names the file and ``reason``
    is one of ``"missing_file"``, ``"corrupt_image"``, ``"too_large"``."""

    def __init__(self, message: str, path: str = "", reason: str = "corrupt_image"):
        # The message alone must be enough to rebuild the error: a DataLoader worker re-raises it
        # in the main process as ``type(err)(text)``.
        super().__init__(message)
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep path and reason when pickled across processes
        return type(self), (str(self), self.path, self.reason)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB, correctly for each mode."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (e.g. 16-bit PNG, medical/scientific TIFF). Pillow's convert("RGB")
        # *clips* values to 0..255, turning almost every pixel white; scale the 0..65535 range
        # down instead. Mode "I" (32-bit int) is how some Pillow versions open 16-bit PNGs, so it
        # is read as 16-bit too.
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        # convert("RGBA") understands every alpha flavour: an alpha band, premultiplied alpha,
        # and a palette / colour-key "transparency" entry (P, L or RGB images with tRNS).
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))  # alpha blend: bg*(1-a) + image*a
        return background
    # L, 1, P, CMYK (Pillow already undoes Adobe's inverted CMYK JPEGs), YCbCr, F, RGB.
    # Embedded ICC profiles are not applied: colours are as Pillow decodes them.
    return img.convert("RGB")


def load_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS,
               output_size: Optional[Callable[[int, int], Tuple[int, int]]] = None) -> Image.Image:
    """Read an image file as an 8-bit RGB `PIL.Image`, upright.

    - EXIF orientation is applied (`ImageOps.exif_transpose`): phone photos are often stored
      sideways with a tag saying how to rotate them, and "left of" must mean what a viewer sees.
    - Every Pillow mode is converted to RGB (see `_to_rgb`): alpha is composited onto white
      (`ALPHA_BACKGROUND`), 16-bit greyscale is scaled (not clipped) to 8 bits.
    - Images with more than ``max_pixels`` pixels are refused before decoding (decompression-bomb
      guard; Pillow's own DecompressionBombWarning/Error become `ImageLoadError` too).
    - A missing, truncated or corrupt file raises `ImageLoadError` naming the file. Its message
      speaks of the file alone (callers with a dataset behind them add where to look, `BadSample`).
    - ``output_size`` (the size function of the resize that follows, `ImageTransform.output_size`):
      a JPEG is decoded at reduced scale when that is exact for the resize (`jpeg_draft_scale`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: image file not found", path, "missing_file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and above 2x its limit raises) on huge images; make the warning an
            # exception so that no oversized image is ever decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(f"{path}: {_too_large_message(width, height, max_pixels)}",
                                         path, "too_large")
                if output_size is not None and img.format == "JPEG":
                    _draft(img, output_size)
                img.load()  # decode now: truncation and corruption surface here, inside the try
                upright = ImageOps.exif_transpose(img)
                rgb = _to_rgb(upright)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{path}: {err}. Refused as a decompression bomb; if the image is genuine, "
                             "raise max_pixels (pixel_bert.data.MAX_IMAGE_PIXELS) and "
                             "PIL.Image.MAX_IMAGE_PIXELS, which Pillow enforces itself",
                             path, "too_large") from err
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ...)
        # on broken files; any of them means "this file is unusable", never "stop the run".
        raise ImageLoadError(f"{path}: cannot decode image ({type(err).__name__}: {err}); the file is "
                             "truncated or corrupt", path, "corrupt_image") from err
    if rgb.mode != "RGB":  # defensive: every branch of _to_rgb returns RGB
        raise ImageLoadError(f"{path}: could not convert mode {rgb.mode} to RGB", path, "corrupt_image")
    return rgb


def jpeg_draft_scale(width: int, height: int, output_size: Callable[[int, int], Tuple[int, int]]) -> int:
    """The largest JPEG decoding scale 1/s (s in 8, 4, 2, 1) that changes nothing downstream.

    libjpeg can decode a JPEG straight to 1/2, 1/4 or 1/8 of its size (DCT scaling: Pillow's draft
    mode), to ``ceil(width / s) x ceil(height / s)`` pixels, for a fraction of the work. A scale is
    used only when the reduced image is still at least the resize target on both sides (the resize
    stays a reduction, never an enlargement) and gives exactly the same output size, so a batch
    has the same shapes with and without it. ``width``/``height`` are as stored in the file.
    """
    target = output_size(width, height)
    for s in (8, 4, 2):
        if min(width, height) < s:
            continue
        reduced = (-(-width // s), -(-height // s))  # ceil division: libjpeg rounds up
        if reduced[0] >= target[0] and reduced[1] >= target[1] and output_size(*reduced) == target:
            return s
    return 1


def _draft(img: Image.Image, output_size: Callable[[int, int], Tuple[int, int]]) -> None:
    """Switch a just-opened JPEG to reduced-scale decoding (`jpeg_draft_scale`), before it is loaded."""
    width, height = img.size  # as stored
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap the axes:
        stored_output_size = lambda w, h: output_size(h, w)[::-1]  # noqa: E731 - the resize sees it upright
    else:
        stored_output_size = output_size
    scale = jpeg_draft_scale(width, height, stored_output_size)
    if scale > 1:
        # Pillow picks the largest scale s with floor(size / request) >= s on both sides, which is
        # exactly ours for this request; the mode is kept (RGB conversion is _to_rgb's job).
        img.draft(img.mode, (width // scale, height // scale))


def _too_large_message(width: int, height: int, max_pixels: int) -> str:
    return (f"image is {width}x{height} = {width * height:,} pixels, more than max_pixels={max_pixels:,}; "
            "refused as a likely decompression bomb. If the image is genuine, raise max_pixels "
            "(default pixel_bert.data.MAX_IMAGE_PIXELS)")


def read_image_size(path: str) -> Tuple[int, int]:
    """(width, height) of an image *as displayed* (EXIF rotation applied), from its header only.

    Opening with Pillow reads the header, not the pixels, so this is cheap; it is what
    `aspect_ratio_group_ids` uses when the annotations do not give image sizes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)  # 0x0112 = EXIF Orientation
    if orientation in (5, 6, 7, 8):  # the four orientations that rotate by 90 degrees
        width, height = height, width
    return width, height


# ------------------------------------------------------------------------------------------------
# Resize, normalise, pad
# ------------------------------------------------------------------------------------------------

class ImageTransform:
    """Keep-aspect-ratio resize and normalisation (Sec. 4.1 of the paper, "Implementation Details").

    The image is scaled so that its shorter side is ``short_side``, unless that would make its
    longer side exceed ``long_side``, in which case the longer side is ``long_side`` (800/1333 for
    R50, 600/1000 for X152, 64/64 for the tiny config). Resampling is bilinear with antialiasing
    (Pillow widens the filter when shrinking). Then the image becomes a float tensor (3, H, W) in
    the pixel convention of the CNN's weights, ``image_format``: "rgb" is RGB in [0, 1] (torchvision),
    "bgr255" is BGR in [0, 255] (Caffe2/Detectron), and is normalised as (x - mean) / std in those
    units (ImageNet's mean/std for torchvision weights; Detectron's pixel means and std 1).

    There is deliberately no random horizontal flip: captions say "left of" / "right of", and a
    flipped image would contradict its caption.
    """

    def __init__(self, short_side: int, long_side: int,
                 mean: Sequence[float], std: Sequence[float], image_format: str = "rgb",
                 jpeg_draft: bool = False):
        if short_side <= 0 or long_side <= 0:
            raise ValueError(f"ImageTransform: short_side and long_side must be positive, "
                             f"got {short_side}/{long_side}")
        if short_side > long_side:
            raise ValueError(f"ImageTransform: short_side {short_side} > long_side {long_side}; "
                             "set image_short_side <= image_long_side in the ModelConfig")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"ImageTransform: mean and std need 3 values, std > 0; got {mean}, {std}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"ImageTransform: image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.image_format = image_format
        self.short_side = int(short_side)
        self.long_side = int(long_side)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.jpeg_draft = jpeg_draft

    @classmethod
    def from_config(cls, cfg) -> "ImageTransform":
        """The transform a `pixel_bert.config.ModelConfig` asks for."""
        return cls(cfg.image_short_side, cfg.image_long_side, cfg.image_mean, cfg.image_std,
                   cfg.image_format, cfg.image_jpeg_draft)

    def load(self, path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
        """`load_image` then this transform; with ``jpeg_draft`` a JPEG much larger than the output
        is decoded at reduced scale (`jpeg_draft_scale`: same output size, nearly the same pixels)."""
        return self(load_image(path, max_pixels, self.output_size if self.jpeg_draft else None))

    def output_size(self, width: int, height: int) -> Tuple[int, int]:
        """(new_width, new_height) for an input of ``width`` x ``height``."""
        short, long = min(width, height), max(width, height)
        scale = self.short_side / short
        if long * scale > self.long_side:
            scale = self.long_side / long
        # The side that hit its target comes out exact; round() keeps the other within half a pixel.
        return max(1, round(width * scale)), max(1, round(height * scale))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"ImageTransform expects a PIL.Image (from load_image), got {type(img).__name__}")
        if img.mode != "RGB":  # a PIL image handed in directly gets what a file gets (alpha on white)
            img = _to_rgb(img)
        size = self.output_size(*img.size)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8))      # (H, W, 3), a writable copy
        pixels = pixels.permute(2, 0, 1).contiguous().float()           # (3, H, W) RGB in [0, 255]
        if self.image_format == "bgr255":
            pixels = pixels.flip(0)                                     # BGR in [0, 255] (Caffe2 weights)
        else:
            pixels = pixels.div_(255.0)                                 # RGB in [0, 1] (torchvision weights)
        return (pixels - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"ImageTransform(short_side={self.short_side}, long_side={self.long_side}, "
                f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}, "
                f"image_format={self.image_format!r}, jpeg_draft={self.jpeg_draft})")


def pad_images(images: Sequence[torch.Tensor], size_divisor: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes into one batch, padding at the bottom and right.

    Returns ``(batch (B, 3, H, W), pixel_mask (B, H, W) bool)`` where H, W are the largest height
    and width in the batch (rounded up to a multiple of ``size_divisor``, default 1 = no rounding)
    and ``pixel_mask`` is True on real pixels. Padding is zero, which after normalisation is the
    dataset's mean colour; the mask, not the value, is what keeps padded feature pixels out of
    attention and out of random pixel sampling (docs/paper.md#model-architecture).
    """
    if len(images) == 0:
        raise ValueError("pad_images: got an empty list of images")
    for i, img in enumerate(images):
        if img.dim() != 3:
            raise ValueError(f"pad_images: images[{i}] has shape {tuple(img.shape)}, expected (C, H, W)")
        if img.shape[0] != images[0].shape[0]:
            raise ValueError(f"pad_images: images[{i}] has {img.shape[0]} channels, images[0] has "
                             f"{images[0].shape[0]}")
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    if size_divisor > 1:
        height = math.ceil(height / size_divisor) * size_divisor
        width = math.ceil(width / size_divisor) * size_divisor
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, img in enumerate(images):  # one copy per image
        batch[i, :, : img.shape[1], : img.shape[2]] = img
        pixel_mask[i, : img.shape[1], : img.shape[2]] = True
    return batch, pixel_mask


# ------------------------------------------------------------------------------------------------
# Annotation readers (docs/paper.md#data-formats: the files exactly as distributed)
# ------------------------------------------------------------------------------------------------

class CaptionRecord(NamedTuple):
    """One (image, caption) pair: an immutable tuple, which keeps millions of them (VG has 5M) small.

    ``image_key`` identifies the image across datasets ("coco:123", "vg:456", "flickr30k:1000092795")
    so that ITM negatives can avoid captions of the same image. About half of VG's images are COCO
    images: `read_visual_genome` gives those their "coco:" key, so a VG phrase is never used as a
    "negative" caption of the very same picture.
    ``size`` is the (width, height) when the annotations give it, else None; it lets
    `aspect_ratio_group_ids` skip opening the file.
    """
    image_path: str
    caption: str
    image_key: str
    size: Optional[Tuple[int, int]] = None


class AnnotationError(ValueError):
    """An annotation file is not in the expected format; the message names the file and the entry."""


def read_json(path: str, expected: str) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found (expected {expected})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not valid JSON ({err}); expected {expected}") from err


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def json_field(obj: Any, key: str, types, where: str, path: str) -> Any:
    """``obj[key]``, checked: a clear AnnotationError if obj is not a dict, lacks key, or the value
    has the wrong type (bool is refused where an int is expected, although it subclasses int)."""
    if not isinstance(obj, dict):
        raise AnnotationError(f"{path}: {where} is a {type(obj).__name__}, expected a JSON object")
    if key not in obj:
        raise AnnotationError(f"{path}: {where} has no {key!r}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise AnnotationError(f"{path}: {where}[{key!r}] is {type(value).__name__} {value!r:.60}, "
                              f"expected {_type_names(types)}")
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def json_list(obj: Any, key: str, where: str, path: str) -> list:
    return json_field(obj, key, list, where, path)


def read_coco_captions(annotation_json: str, image_root: str) -> List[CaptionRecord]:
    """Records from a COCO ``captions_{train,val}2014.json``: one per annotation, in file order.

    Format (docs/paper.md#data-formats): ``images[{id, file_name, height, width}]``,
    ``annotations[{id, image_id, caption}]``. Image paths are ``image_root/file_name``; keys are
    ``"coco:{image_id}"``; sizes come from the json (no file needs opening to group by aspect).
    """
    path = os.fspath(annotation_json)
    data = read_json(path, "a COCO captions file with 'images' and 'annotations'")
    images = json_list(data, "images", "the top-level object", path)
    annotations = json_list(data, "annotations", "the top-level object", path)
    by_id: Dict[int, Tuple[str, Optional[Tuple[int, int]]]] = {}
    first_index: Dict[int, int] = {}
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_id = json_field(image, "id", int, where, path)
        file_name = json_field(image, "file_name", str, where, path)
        if image_id in first_index:
            raise AnnotationError(f"{path}: {where} has id {image_id}, which images[{first_index[image_id]}] has "
                                  "too: captions of that id would be paired with the wrong image")
        first_index[image_id] = i
        size = None
        if "width" in image and "height" in image:
            size = (json_field(image, "width", int, where, path), json_field(image, "height", int, where, path))
        by_id[image_id] = (os.path.join(image_root, file_name), size)
    records = []
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = json_field(ann, "image_id", int, where, path)
        caption = json_field(ann, "caption", str, where, path)
        if image_id not in by_id:
            raise AnnotationError(f"{path}: {where} refers to image_id {image_id}, which is not in 'images'")
        image_path, size = by_id[image_id]
        records.append(CaptionRecord(image_path, caption.strip(), f"coco:{image_id}", size))
    return records


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def karpathy_images(dataset_json: str, splits: Sequence[str]) -> Tuple[str, str, List[Tuple[int, dict]]]:
    """(path, dataset name, [(position, image entry)]) of the Karpathy images in ``splits``."""
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown:
        raise ValueError(f"unknown Karpathy split(s) {unknown}; the splits are {list(KARPATHY_SPLITS)}")
    path = os.fspath(dataset_json)
    data = read_json(path, "a Karpathy dataset_*.json with 'images'")
    images = json_list(data, "images", "the top-level object", path)
    dataset = data.get("dataset", "karpathy")
    if not isinstance(dataset, str):
        raise AnnotationError(f"{path}: 'dataset' is {type(dataset).__name__}, expected a string")
    selected = []
    for i, image in enumerate(images):
        split = json_field(image, "split", str, f"images[{i}]", path)
        if split not in KARPATHY_SPLITS:
            raise AnnotationError(f"{path}: images[{i}] has split {split!r}, "
                                  f"expected one of {list(KARPATHY_SPLITS)}")
        if split in splits:
            selected.append((i, image))
    return path, dataset, selected


def read_karpathy(dataset_json: str, image_root: str,
                  splits: Sequence[str] = ("train", "restval")) -> List[CaptionRecord]:
    """Records from Karpathy's ``dataset_coco.json`` or ``dataset_flickr30k.json``.

    Format (docs/paper.md#data-formats): ``images[{filepath?, filename, imgid, cocoid?, split,
    sentences[{raw, ...}]}]``. The default splits are the paper's pre-training split for COCO
    (train + restval, Sec. 4.1). Image paths are ``image_root/filepath/filename`` for COCO
    (filepath is "train2014" or "val2014") and ``image_root/filename`` for Flickr30K (no filepath).
    Captions are the ``raw`` sentences. Keys are ``"coco:{cocoid}"`` (the same keys as
    `read_coco_captions`) or ``"{dataset}:{filename without extension}"`` for Flickr30K.
    """
    path, dataset, selected = karpathy_images(dataset_json, splits)
    records = []
    first_index: Dict[str, int] = {}
    for i, image in selected:
        where = f"images[{i}]"
        filename = json_field(image, "filename", str, where, path)
        filepath = json_field(image, "filepath", str, where, path) if "filepath" in image else ""
        image_path = os.path.join(image_root, filepath, filename)
        if image_path in first_index:
            raise AnnotationError(f"{path}: {where} is image {os.path.join(filepath, filename)}, which "
                                  f"images[{first_index[image_path]}] is too: each image must be listed once")
        first_index[image_path] = i
        if "cocoid" in image:
            key = f"coco:{json_field(image, 'cocoid', int, where, path)}"
        else:
            key = f"{dataset}:{os.path.splitext(filename)[0]}"
        for j, sentence in enumerate(json_list(image, "sentences", where, path)):
            raw = json_field(sentence, "raw", str, f"{where}['sentences'][{j}]", path)
            records.append(CaptionRecord(image_path, raw.strip(), key))
    return records


def karpathy_coco_ids(dataset_json: str, splits: Sequence[str]) -> Set[int]:
    """The COCO image ids (``cocoid``) of the Karpathy ``splits`` in ``dataset_coco.json``.

    Used to drop the COCO Karpathy val/test images from Visual Genome (Sec. 4.1 of the paper).
    """
    path, _, selected = karpathy_images(dataset_json, splits)
    ids = set()
    for i, image in selected:
        if isinstance(image, dict) and "cocoid" not in image:
            raise AnnotationError(f"{path}: images[{i}] has no 'cocoid'; pass Karpathy's dataset_coco.json "
                                  "(dataset_flickr30k.json has no COCO ids)")
        ids.add(json_field(image, "cocoid", int, f"images[{i}]", path))
    return ids


VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def _vg_image_path(image_root: str, image_id: int) -> str:
    """The VG image file: ``VG_100K/`` or ``VG_100K_2/`` (the two zip parts), whichever holds it.
    If neither does, the first candidate is returned so that loading it reports a missing file."""
    candidates = [os.path.join(image_root, d, f"{image_id}.jpg") for d in VG_IMAGE_DIRS]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return candidates[0]


def read_visual_genome(region_json: str, image_data_json: str, image_root: str,
                       exclude_coco_ids: Iterable[int] = ()) -> List[CaptionRecord]:
    """Records from Visual Genome ``region_descriptions.json``: one per region, the phrase as caption.

    Format (docs/paper.md#data-formats): a list of ``{id, regions[{region_id, image_id, phrase, x, y,
    width, height}]}``; ``image_data.json`` lists ``{image_id, coco_id, width, height, ...}``.
    Images whose ``coco_id`` is in ``exclude_coco_ids`` are dropped: pass the COCO Karpathy val and
    test ids (`karpathy_coco_ids`) so no retrieval test image is seen in pre-training
    (Sec. 4.1). Keys are ``"vg:{image_id}"``, or ``"coco:{coco_id}"`` for VG images taken from
    COCO. Region boxes are not used (Pixel-BERT has no boxes).
    """
    exclude = set(exclude_coco_ids)
    info_path = os.fspath(image_data_json)
    image_data = read_json(info_path, "Visual Genome image_data.json (a list of images)")
    if not isinstance(image_data, list):
        raise AnnotationError(f"{info_path}: top level is a {type(image_data).__name__}, "
                              "expected a list of images")
    info: Dict[int, Tuple[Optional[int], Optional[Tuple[int, int]]]] = {}
    for i, entry in enumerate(image_data):
        where = f"[{i}]"
        id_key = "image_id" if isinstance(entry, dict) and "image_id" in entry else "id"  # v1.2 / v1.0
        image_id = json_field(entry, id_key, int, where, info_path)
        coco_id = json_field(entry, "coco_id", (int, type(None)), where, info_path) if "coco_id" in entry else None
        size = None
        if "width" in entry and "height" in entry:
            size = (json_field(entry, "width", int, where, info_path),
                    json_field(entry, "height", int, where, info_path))
        if image_id in info:
            raise AnnotationError(f"{info_path}: {where} is image {image_id}, listed earlier in the file too")
        info[image_id] = (coco_id, size)

    path = os.fspath(region_json)
    regions_by_image = read_json(path, "Visual Genome region_descriptions.json (a list of images)")
    if not isinstance(regions_by_image, list):
        raise AnnotationError(f"{path}: top level is a {type(regions_by_image).__name__}, expected a list")
    records = []
    seen: Set[int] = set()
    for i, entry in enumerate(regions_by_image):
        where = f"[{i}]"
        id_key = "id" if isinstance(entry, dict) and "id" in entry else "image_id"
        image_id = json_field(entry, id_key, int, where, path)
        regions = json_list(entry, "regions", where, path)
        if image_id in seen:
            raise AnnotationError(f"{path}: {where} is image {image_id}, listed earlier in the file too: its "
                                  "regions would be counted twice")
        seen.add(image_id)
        if image_id not in info:
            raise AnnotationError(f"{path}: {where} is image {image_id}, which {info_path} does not list; "
                                  "are the two files from the same Visual Genome version?")
        coco_id, size = info[image_id]
        if coco_id is not None and coco_id in exclude:
            continue
        image_path = _vg_image_path(image_root, image_id)  # one lookup per image, shared by its regions
        # A VG image that is a COCO image gets the COCO key: same picture, same key (ITM negatives).
        key = f"coco:{coco_id}" if coco_id is not None else f"vg:{image_id}"
        for j, region in enumerate(regions):
            phrase = json_field(region, "phrase", str, f"{where}['regions'][{j}]", path)
            records.append(CaptionRecord(image_path, phrase.strip(), key, size))
    return records


def build_pretrain_records(karpathy_coco_json: str, coco_image_root: str,
                           vg_region_json: Optional[str] = None, vg_image_data_json: Optional[str] = None,
                           vg_image_root: Optional[str] = None) -> List[CaptionRecord]:
    """The paper's pre-training data (Sec. 4.1 of the paper): COCO Karpathy train + restval, plus
    (if given) Visual Genome regions of every image that is not a COCO Karpathy val/test image."""
    records = read_karpathy(karpathy_coco_json, coco_image_root, splits=("train", "restval"))
    vg_args = (vg_region_json, vg_image_data_json, vg_image_root)
    if any(a is not None for a in vg_args):
        if not all(a is not None for a in vg_args):
            raise ValueError("build_pretrain_records: give all of vg_region_json, vg_image_data_json and "
                             "vg_image_root, or none of them")
        held_out = karpathy_coco_ids(karpathy_coco_json, ("val", "test"))
        records += read_visual_genome(vg_region_json, vg_image_data_json, vg_image_root,
                                      exclude_coco_ids=held_out)
    return records


# ------------------------------------------------------------------------------------------------
# Dataset and collate
# ------------------------------------------------------------------------------------------------

class BadSampleWarning(UserWarning):
    """A sample was skipped (missing/corrupt image, empty caption). Filter it with `warnings`."""


class BadSampleError(ValueError):
    """A bad sample with ``fatal_bad_samples=True`` (image errors raise `ImageLoadError` instead)."""


# What to do about a bad sample of a dataset, by reason (load_image's own messages speak of the file only).
BAD_SAMPLE_ADVICE = {
    "missing_file": "; check that the image folder flag points at the folder holding the dataset's images "
                    "and that they are fully extracted",
    "corrupt_image": "; re-download or re-extract it, or drop it from the annotations",
}


class BadSample(NamedTuple):
    """What a dataset returns instead of a sample it cannot use: the file at fault, why
    (``"missing_file"``, ``"corrupt_image"``, ``"too_large"``, ``"empty_caption"``) and a message
    naming the file and the fix. A small picklable tuple, so it crosses from DataLoader workers."""
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


def add_pretrain_data_arguments(parser, title: str = "pre-training data (the official layouts)"):
    """The flags of the pre-training readers above (train.py's, and `python -m pixel_bert.datasets verify`'s)."""
    g = parser.add_argument_group(title)
    g.add_argument("--coco-karpathy", help="Karpathy dataset_coco.json: COCO train + restval captions")
    g.add_argument("--coco-images", help="COCO image root holding train2014/ and val2014/")
    g.add_argument("--coco-captions", help="a COCO captions_*.json (e.g. one written by python -m "
                   "pixel_bert.synthetic); images under --coco-captions-images")
    g.add_argument("--coco-captions-images", help="image folder of --coco-captions (default: images/ next to it)")
    g.add_argument("--vg-regions", help="Visual Genome region_descriptions.json")
    g.add_argument("--vg-image-data", help="Visual Genome image_data.json (maps VG ids to COCO ids)")
    g.add_argument("--vg-images", help="Visual Genome root holding VG_100K/ and VG_100K_2/")
    return g


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
    """``make_batch_sampler(epoch)`` for `pixel_bert.engine.Trainer`: this rank's share of the
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
