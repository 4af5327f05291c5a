"""JPEG decoding on the GPU, a batch at a time, for hosts with too few CPU cores per GPU (docs/costs.md:
an 8 x H100 node's 14 cores per GPU cannot decode + resize + normalise the ~600 images/s one H100
trains on, so image loading, not the GPU, would set the pace).

With ``TrainConfig.decode_images_on_device``, a DataLoader worker only reads a JPEG's header (size,
EXIF orientation) and its bytes (`read_encoded`, well under a millisecond); the training step decodes
the batch's JPEGs in one call of ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on a GPU),
then applies the EXIF orientation, `ImageTransform`'s keep-ratio resize (bilinear, antialiased) and
normalisation, and pads the batch (`pad_images`), all on the device (`decode_batch`). Anything else
(PNGs, CMYK JPEGs, in-memory synthetic images) is decoded in the worker as before and travels as the
finished tensor. On a CPU the same code decodes with torchvision's libjpeg; tests/test_scale.py checks
that it gives the Pillow path's shapes and pixels to within a grey level on average.

torchvision marks its image decoders deprecated from 0.29 in favour of TorchCodec; they still work.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision.io as tio
from PIL import Image

from .bad_samples import BadSample
from .batches import CaptionCollator, CaptionDataset
from .images import MAX_IMAGE_PIXELS, ImageLoadError, ImageTransform, pad_images

EXIF_ORIENTATION = 0x0112
JPEG_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB (Pillow shows YCbCr JPEGs as RGB); CMYK is not


class EncodedImage(NamedTuple):
    """A JPEG file's bytes (uint8 (n,)) and its EXIF orientation (1 = upright ... 8), not decoded."""
    data: torch.Tensor
    orientation: int
    path: str


def read_encoded(path: str, transform: Optional[ImageTransform] = None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> Union[EncodedImage, torch.Tensor]:
    """The bytes of a JPEG the device can decode, with its orientation (read from the header only);
    any other image is decoded here with ``transform`` (``ImageTransform.load``). Raises ImageLoadError
    for a missing file, an unreadable header or too many pixels, as `pixel_bert.images.load_image` does."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: image file not found", path, "missing_file")
    try:
        with Image.open(path) as img:  # the header: nothing is decoded
            jpeg, mode, (width, height) = img.format == "JPEG", img.mode, img.size
            orientation = int(img.getexif().get(EXIF_ORIENTATION, 1)) if jpeg else 1
    except Exception as err:  # noqa: BLE001 - Pillow raises many types on broken files
        raise ImageLoadError(f"{path}: cannot read the image header ({type(err).__name__}: {err})", path,
                             "corrupt_image") from err
    if width * height > max_pixels:
        raise ImageLoadError(f"{path}: {width}x{height} = {width * height:,} pixels exceeds max_pixels "
                             f"{max_pixels:,}", path, "too_large")
    if not (jpeg and mode in JPEG_MODES and 1 <= orientation <= 8):
        if transform is None:
            raise ImageLoadError(f"{path}: not a JPEG the device can decode (mode {mode})", path, "corrupt_image")
        return transform.load(path, max_pixels)
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    return EncodedImage(data, orientation, path)


def apply_orientation(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as seen upright, for EXIF orientation 1..8 (what PIL.ImageOps.exif_transpose does)."""
    h, w = -2, -1
    return {1: lambda x: x, 2: lambda x: x.flip(w), 3: lambda x: x.flip(h, w), 4: lambda x: x.flip(h),
            5: lambda x: x.transpose(h, w), 6: lambda x: x.rot90(-1, (h, w)),
            7: lambda x: x.transpose(h, w).flip(h, w), 8: lambda x: x.rot90(1, (h, w))}[orientation](pixels)


class DeviceDecoder:
    """Decode, orient, resize and normalise a batch of `EncodedImage`s on ``device`` as ``transform``
    does on the CPU; finished tensors (images the worker decoded) pass through."""

    def __init__(self, transform: ImageTransform, device):
        self.transform = transform
        self.device = torch.device(device)
        self.mean, self.std = transform.mean.to(self.device), transform.std.to(self.device)

    def _decode(self, encoded: List[EncodedImage]) -> List[Optional[torch.Tensor]]:
        """uint8 (3, h, w) per JPEG, None where it cannot be decoded: one batched call, and one call per
        image only when that fails (the batched call returns nothing if any image is broken)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice, once per call
            try:
                return list(tio.decode_jpeg([e.data for e in encoded], mode=tio.ImageReadMode.RGB,
                                            device=self.device))
            except RuntimeError:
                out = []
                for e in encoded:
                    try:
                        out.append(tio.decode_jpeg(e.data, mode=tio.ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        out.append(None)
                return out

    def finish(self, pixels: torch.Tensor, orientation: int) -> torch.Tensor:
        """uint8 (3, h, w) -> the normalised float (3, H, W) of `ImageTransform`."""
        pixels = apply_orientation(pixels, orientation)
        width, height = self.transform.output_size(pixels.shape[2], pixels.shape[1])
        x = pixels[None].float()
        if (height, width) != tuple(pixels.shape[1:]):
            x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        x = x[0].clamp_(0, 255)
        if self.transform.image_format == "bgr255":
            x = x.flip(0)                                    # BGR in [0, 255] (Caffe2 weights)
        else:
            x = x / 255.0                                    # RGB in [0, 1] (torchvision weights)
        return (x - self.mean) / self.std

    def __call__(self, items: Sequence[Union[EncodedImage, torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """One normalised (3, H, W) tensor on the device per item; None for a JPEG that does not decode."""
        encoded = [i for i, item in enumerate(items) if isinstance(item, EncodedImage)]
        decoded = dict(zip(encoded, self._decode([items[i] for i in encoded]) if encoded else []))
        out = []
        for i, item in enumerate(items):
            if i not in decoded:
                out.append(item.to(self.device, non_blocking=True))
            elif decoded[i] is None:
                out.append(None)
            else:
                out.append(self.finish(decoded[i], item.orientation))
        return out


class _Encoder:
    """A transform whose ``load`` is `read_encoded` (what `EncodedCaptionDataset` gives CaptionDataset)."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def load(self, path: str, max_pixels: int = MAX_IMAGE_PIXELS):
        return read_encoded(path, self.transform, max_pixels)


class EncodedCaptionDataset(CaptionDataset):
    """`CaptionDataset` whose samples carry `read_encoded`'s result under ``image``: the JPEG's bytes
    (decoded later, on the device) or, for other images, the finished tensor."""

    def __init__(self, records, transform: ImageTransform, fatal_bad_samples: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(records, _Encoder(transform), fatal_bad_samples, max_pixels)


class EncodedCaptionCollator(CaptionCollator):
    """`CaptionCollator` that leaves the images undecoded: ``encoded_images`` (a list of `EncodedImage`
    or tensors) instead of ``images`` / ``pixel_mask``, which `decode_batch` adds on the device."""

    def __call__(self, samples):
        images = [s["image"] for s in samples if not isinstance(s, BadSample)]
        placeholders = [dict(s, image=torch.zeros(3, 1, 1)) if not isinstance(s, BadSample) else s for s in samples]
        batch = super().__call__(placeholders)
        del batch["images"], batch["pixel_mask"]
        batch["encoded_images"] = images
        return batch


def decode_batch(batch: Dict[str, Any], transform: ImageTransform, size_divisor: int, device) -> Dict[str, Any]:
    """Decode ``batch["encoded_images"]`` on ``device`` into ``images`` / ``pixel_mask``, in place. A JPEG
    that does not decode is dropped with its caption and counted as a bad sample (``num_bad``,
    ``bad_samples``), as the collator does for files that cannot be read."""
    items = batch.pop("encoded_images")
    images = DeviceDecoder(transform, device)(items)
    bad = [i for i, x in enumerate(images) if x is None]
    if bad:
        keep = [i for i, x in enumerate(images) if x is not None]
        batch["bad_samples"] = list(batch.get("bad_samples", [])) + [
            BadSample(items[i].path, "corrupt_image", f"{items[i].path}: the JPEG does not decode on the device "
                      "(truncated or corrupt); re-download or re-extract it, or drop it from the annotations")
            for i in bad]
        if not keep:
            raise ImageLoadError(f"none of the {len(images)} JPEGs of a batch decodes, e.g. {items[0].path}",
                                 items[0].path)
        index = torch.tensor(keep)
        for key in ("input_ids", "attention_mask", "indices"):
            batch[key] = batch[key][index]
        for key in ("image_keys", "captions"):
            batch[key] = [batch[key][i] for i in keep]
        images = [images[i] for i in keep]
        batch["num_samples"], batch["num_bad"] = len(keep), batch.get("num_bad", 0) + len(bad)
    batch["images"], batch["pixel_mask"] = pad_images(images, size_divisor)
    return batch
