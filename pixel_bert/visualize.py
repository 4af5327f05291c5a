"""Draw Pixel-BERT's text-to-pixel attention as heat maps over the image (Sec. 4.4 of the paper).

    python -m pixel_bert.visualize --checkpoint runs/demo/model.pt --image img.png \\
        --text "a red circle above a blue square" --tokens red circle --out attention.png

The PNG shows the image, then one panel per chosen token: the token's attention over the feature
pixels (`pixel_bert.inference.AttentionMaps`, renormalised over the pixels, heads averaged unless
``--head``), upsampled bilinearly from the coarse feature grid to the image and overlaid as a heat
map. Each panel is scaled to its own maximum (brightest = the cell the token attends to most; a
flat map is bright all over); under it, "peak Nx uniform" says how concentrated the map is
(largest cell / mean cell; 1.0 is flat) and "M% on pixels" how much of the token's attention goes
to the image at all (the rest goes to the words). Drawing is numpy + Pillow only: the colormap is a small
piecewise-linear one defined here, no matplotlib.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .cli import add_debug_argument, int_at_least, run_cli
from .files import atomic_write, make_output_folder
from .images import load_image
from .inference import AttentionMaps, PixelBertPredictor

# An "inferno"-like ramp: black -> purple -> red -> orange -> pale yellow. Perceptually ordered
# (brightness rises monotonically), so the hottest spot is also the brightest on any screen or
# in greyscale print.
HEAT_ANCHORS = np.array([
    (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
    (250, 193, 39), (252, 255, 164)], dtype=np.float32)
BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)
SUBTLE = (110, 110, 110)
SPECIAL = ("[CLS]", "[SEP]", "[PAD]")


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB uint8 (..., 3) along HEAT_ANCHORS, channel by
    channel with np.interp (vectorised over all pixels)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(HEAT_ANCHORS))
    rgb = np.stack([np.interp(v, stops, HEAT_ANCHORS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def upsample(attention: torch.Tensor, size, extent=None) -> np.ndarray:
    """(gh, gw) map -> (height, width) by bilinear interpolation, ``size`` = (width, height) of the
    picture. ``extent`` = (width, height), in the same pixels, of what the grid covers: the image
    sits at its top-left and the rest is padding (`AttentionMaps.extent`), so the map is upsampled
    to the extent and cut to the image, never stretched over it. None: the grid covers the image."""
    a = torch.as_tensor(attention, dtype=torch.float32)[None, None]
    w, h = size
    ew, eh = extent if extent is not None else size
    full = F.interpolate(a, size=(max(round(eh), h), max(round(ew), w)), mode="bilinear", align_corners=False)
    return full[0, 0, :h, :w].numpy()


def overlay(image: Image.Image, attention: torch.Tensor, extent=None) -> Image.Image:
    """The image with ``attention`` (gh, gw) upsampled (`upsample`, ``extent`` as there) and blended on
    top as a heat map.

    The map is divided by its own maximum: the hottest cell is bright yellow, a cell with half its
    attention is half way down the ramp, and a flat map is bright all over (it looks everywhere),
    so a picture never shows more contrast than the map has. The photo is dimmed and desaturated
    so the heat stands out, and the heat's opacity grows with the value, so cold regions still show
    the picture."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = upsample(attention, image.size, extent)
    a = a / max(float(a.max()), 1e-12)
    grey = rgb.mean(axis=2, keepdims=True)
    base = 0.55 * (0.4 * rgb + 0.6 * grey)                          # dimmed, mostly grey photo
    alpha = (0.2 + 0.7 * a)[..., None]                              # opacity of the heat
    out = (1 - alpha) * base + alpha * colormap(a).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def peak_over_uniform(attention: torch.Tensor) -> float:
    """The map's largest cell over its mean cell: 1.0 for a flat map, gh*gw if one cell takes all."""
    a = torch.as_tensor(attention, dtype=torch.float64)
    return float(a.max() / a.mean().clamp_min(1e-12))


def _font(size: int):
    """Pillow's default font at ``size`` (scalable where Pillow has FreeType, else its bitmap)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def choose_tokens(maps: AttentionMaps, tokens: Optional[Sequence[str]] = None) -> List[int]:
    """Sequence positions to draw: those of ``tokens`` (first occurrence each; a KeyError lists the
    text's tokens when one is absent), or every token except [CLS]/[SEP]/[PAD] when None."""
    if tokens:
        return [maps.index(t) for t in tokens]
    return [i for i, t in enumerate(maps.tokens) if t not in SPECIAL]


PAD, LABEL_H, TITLE_H, BAR_H = 10, 50, 44, 28  # layout of the figure, in pixels


def panel_size(image_size, panel: int):
    """(width, height) of one panel: the image scaled so its longer side is ``panel``."""
    scale = panel / max(image_size)
    return max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))


def figure_size(image_size, num_tokens: int, panel: int = 160, columns: int = 6):
    """(width, height) of `attention_figure` for an image of ``image_size`` and ``num_tokens``
    heat-map panels (plus the image panel), ``columns`` panels a row."""
    pw, ph = panel_size(image_size, panel)
    n = 1 + num_tokens
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    return PAD + cols * (pw + PAD), TITLE_H + rows * (ph + LABEL_H) + BAR_H + PAD


def attention_figure(image: Image.Image, maps: AttentionMaps, tokens: Optional[Sequence[str]] = None,
                     panel: int = 160, columns: int = 6, title: Optional[str] = None) -> Image.Image:
    """The figure as a PIL image: the input, then one heat-map panel per token, ``columns`` panels
    a row; each panel's longer side is ``panel`` pixels; a title line and a colour bar."""
    positions = choose_tokens(maps, tokens)
    pw, ph = panel_size(image.size, panel)
    shown = image.convert("RGB").resize((pw, ph), Image.Resampling.BICUBIC)
    pad, label_h, title_h, bar_h = PAD, LABEL_H, TITLE_H, BAR_H
    cols = max(1, min(columns, 1 + len(positions)))
    width, height = figure_size(image.size, len(positions), panel, columns)
    fig = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    big, small = _font(15), _font(11)
    head = "mean of heads" if maps.head is None else f"head {maps.head}"
    draw.text((pad, 6), _fit(draw, title or " ".join(t for t in maps.tokens if t not in SPECIAL), big,
                             width - 2 * pad), fill=TEXT, font=big)
    draw.text((pad, 26), _fit(draw, f"attention of each word over the feature pixels ({maps.grid[0]} x "
                                    f"{maps.grid[1]} grid), layer {maps.layer}, {head}", small,
                              width - 2 * pad), fill=SUBTLE, font=small)
    # the grid's extent in panel pixels: the panel shows the resized image the model saw, scaled
    extent = (maps.extent[0] * pw / maps.image_size[0], maps.extent[1] * ph / maps.image_size[1])
    panels = [(shown, "image", [])] + [
        (overlay(shown, maps.maps[i], extent), maps.tokens[i],
         [f"peak {peak_over_uniform(maps.maps[i]):.1f}x uniform", f"{100 * float(maps.pixel_mass[i]):.0f}% on pixels"])
        for i in positions]
    for k, (img, label, notes) in enumerate(panels):
        r, c = divmod(k, cols)
        x, y = pad + c * (pw + pad), title_h + r * (ph + label_h)
        fig.paste(img, (x, y))
        label = _fit(draw, label, big, pw)
        draw.text((x + (pw - _text_width(draw, label, big)) // 2, y + ph + 3), label, fill=TEXT, font=big)
        for line_no, note in enumerate(notes):
            note = _fit(draw, note, small, pw)
            draw.text((x + (pw - _text_width(draw, note, small)) // 2, y + ph + 21 + 13 * line_no), note,
                      fill=SUBTLE, font=small)
    # colour bar: the ramp, with its meaning (each panel is scaled to its own max)
    bar_w, y = 120, height - bar_h
    ramp = colormap(np.tile(np.linspace(0, 1, bar_w), (8, 1)))
    draw.text((pad, y + 3), "0", fill=SUBTLE, font=small)
    x = pad + _text_width(draw, "0", small) + 6
    fig.paste(Image.fromarray(ramp, "RGB"), (x, y + 6))
    legend = "max   (each panel scaled to its own max; peak = max cell / mean cell)"
    draw.text((x + bar_w + 6, y + 3), _fit(draw, legend, small, width - x - bar_w - 6 - pad), fill=SUBTLE,
              font=small)
    return fig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixel_bert.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pixel-bert checkpoint: model.pt of train.py, or its model "
                   "folder (RUN/model/)")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--text", required=True, help="the text whose words' attention is drawn")
    p.add_argument("--tokens", nargs="+", default=None, metavar="TOKEN",
                   help="tokens to draw, as WordPieces of the text (e.g. red circle); "
                        "default: every token but [CLS]/[SEP]")
    p.add_argument("--layer", type=int_at_least(0), default=0,
                   help="transformer layer, 0 = first (the paper's figure), -1 = last (default 0)")
    p.add_argument("--head", type=int_at_least(0), default=None,
                   help="one attention head; default: the mean of all heads")
    p.add_argument("--panel-size", type=int_at_least(1), default=160,
                   help="longer side of each panel in pixels, at least 1 (default 160)")
    p.add_argument("--columns", type=int_at_least(1), default=6, help="panels per row, at least 1 (default 6)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="attention.png", help="output PNG (default attention.png)")
    add_debug_argument(p)
    return p


# What --out may end in: the picture formats Pillow writes without loss of the heat map's colours.
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    suffix = os.path.splitext(args.out)[1].lower()
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; give a file name such as {os.path.join(args.out, 'attention.png')}")
    if suffix not in IMAGE_SUFFIXES:
        parser.error(f"--out {args.out}: give a file name ending in {', '.join(IMAGE_SUFFIXES)}")
    predictor = PixelBertPredictor.from_checkpoint(args.checkpoint, device=args.device)
    image = load_image(args.image)
    # Renormalised or raw makes no difference to the picture (each panel is scaled to its max, and
    # the notes are scale-free), so the figure always uses the renormalised maps.
    maps = predictor.attention_maps(image, args.text, layer=args.layer, head=args.head)
    try:
        fig = attention_figure(image, maps, args.tokens, args.panel_size, args.columns, title=args.text)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}")
    make_output_folder(os.path.dirname(os.path.abspath(args.out)), "--out")
    with atomic_write(args.out) as f:
        fig.save(f, format=IMAGE_SUFFIXES[suffix], optimize=True)
    print(f"wrote {args.out} ({fig.size[0]}x{fig.size[1]}): layer {maps.layer}, "
          f"{'mean of heads' if maps.head is None else f'head {maps.head}'}, tokens "
          f"{[maps.tokens[i] for i in choose_tokens(maps, args.tokens)]}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    run_cli(main)
