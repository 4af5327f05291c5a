"""Image files to model inputs (Sec. 3.2 and 4.1 of the paper): decode any image safely, resize
keeping the aspect ratio, normalise as the CNN's weights expect, and pad a batch with a pixel mask.

    load_image        any Pillow mode -> 8-bit RGB, upright (EXIF), decompression bombs refused
    ImageTransform    keep-ratio resize (800/1333 for R50, 600/1000 for X152) + normalisation
    pad_images        a batch padded at the bottom/right, with the mask of real pixels
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import IMAGE_FORMATS
from .errors import UserError

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

class ImageLoadError(UserError):
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
    if os.path.isdir(path):
        raise ImageLoadError(f"{path}: is a folder, not an image file", path, "missing_file")
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
                             "raise max_pixels (pixel_bert.images.MAX_IMAGE_PIXELS) and "
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
            "(default pixel_bert.images.MAX_IMAGE_PIXELS)")


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
        if img.width == 0 or img.height == 0:
            raise ImageLoadError(f"the image is {img.width}x{img.height}: it has no pixels to resize")
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
