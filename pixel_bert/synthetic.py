"""A synthetic "shapes world": the default dataset of the demo and the tests.

Real pre-training data (COCO + Visual Genome, Sec. 4.1 of the paper) is hundreds of GB. To show on a
CPU in minutes that the model *uses the pixels*, this module draws small images of 1-3 coloured
shapes on a dark noisy background and writes captions whose content words can only be predicted
by looking at the image: "the red shape is a [MASK]" (circle? square?), "a blue square [MASK] a
green cross" (above? left of?). MLM (eq. 7) on these captions therefore needs the visual tokens,
and ITM (eq. 8) needs the caption to agree with the picture.

Everything is a pure function of (seed, image index): no files, no state, identical in every
DataLoader worker. Scenes are plain dataclasses (`Shape`, `Scene`) with pixel boxes, so that
other tasks can be built on the same world (synthetic VQA "what colour is the circle?", NLVR2
image pairs, retrieval) and attention maps can be scored against the boxes (Sec. 4.4 of the paper).

Scene rules (they keep every question about a scene unambiguous):
- 1 to 3 shapes; within a scene every colour and every kind is used at most once, so "the red
  shape" and "the circle" each name exactly one shape;
- boxes are squares, non-overlapping with a gap of a few pixels, so between any two shapes at
  least one of above / below / left of / right of holds strictly.

The vocabulary is closed (`SYNTHETIC_WORDS`, at most 64 entries with BERT's special tokens) so the
tiny model config (vocab_size=64) reads every caption with one token per word and no [UNK].
Run ``python -m pixel_bert.synthetic --out DIR`` to write a COCO-format copy plus vocab.txt.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .cli import add_debug_argument, int_at_least, run_cli
from .config import IMAGENET_MEAN, IMAGENET_STD
from .files import write_json
from .images import ImageTransform
from .tokenizer import SPECIAL_TOKENS, write_vocab_file

# ---- the world -----------------------------------------------------------------------------------

# Six saturated colours, far apart in RGB and all bright against the dark background. (Orange is
# left out: at 96x96 with noise it is too close to red and yellow to be a fair test.)
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 245),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 215),
    "white": (235, 235, 235),
}
KINDS = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Side of a shape's square box as a fraction of the image side, per size word. The two ranges are
# well apart so "small"/"large" are visible facts, not judgement calls.
SIZE_FRACTIONS = {"small": (0.14, 0.20), "large": (0.28, 0.36)}
RELATIONS = ("above", "below", "left of", "right of")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_SHAPES = 3
COLOUR_JITTER = 20        # +- per channel per shape, so the model learns colour names, not exact RGB
BACKGROUND_LEVELS = (10, 70)  # dark background: every channel drawn in this range, per scene
NOISE_STD = 12.0          # per-pixel Gaussian noise over the whole image (shapes included)


@dataclass(frozen=True)
class Shape:
    """One shape. ``box = (x0, y0, x1, y1)`` in pixels, half-open: it covers x0 <= x < x1."""
    colour: str
    kind: str
    size: str
    box: Tuple[int, int, int, int]

    @property
    def center(self) -> Tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    """The shapes of one image, its side in pixels, and the seed of its background noise."""
    shapes: Tuple[Shape, ...]
    image_size: int
    background_seed: int

    def find(self, colour: Optional[str] = None, kind: Optional[str] = None) -> Optional[Shape]:
        """The shape with this colour and/or kind (unique within a scene), or None."""
        for shape in self.shapes:
            if (colour is None or shape.colour == colour) and (kind is None or shape.kind == kind):
                return shape
        return None


def _separated(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int], gap: int) -> bool:
    """True if boxes a and b are at least ``gap`` pixels apart along x or along y."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_scene(rng: np.random.Generator, image_size: int = 96, max_shapes: int = MAX_SHAPES) -> Scene:
    """A random scene: 1..max_shapes shapes of distinct colours and kinds, non-overlapping boxes."""
    if not 1 <= max_shapes <= min(len(COLOURS), len(KINDS)):
        raise ValueError(f"max_shapes must be 1..{min(len(COLOURS), len(KINDS))}, got {max_shapes}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels for shapes to be visible, got {image_size}")
    num_shapes = int(rng.integers(1, max_shapes + 1))
    colours = rng.choice(list(COLOURS), size=num_shapes, replace=False)
    kinds = rng.choice(KINDS, size=num_shapes, replace=False)
    gap = max(2, image_size // 32)      # clear space between boxes: relations hold strictly
    margin = max(1, image_size // 48)   # keep shapes off the border
    shapes: List[Shape] = []
    for colour, kind in zip(colours, kinds):
        wanted = SIZES[int(rng.integers(len(SIZES)))]
        # Rejection-sample a free spot; a crowded scene falls back to a small shape, then gives up
        # on this shape (so 3 large shapes sometimes become 2; the scene stays valid).
        for size in (wanted, "small") if wanted != "small" else ("small",):
            low, high = SIZE_FRACTIONS[size]
            side = int(round(rng.uniform(low, high) * image_size))
            placed = None
            for _ in range(50):
                x0 = int(rng.integers(margin, image_size - margin - side + 1))
                y0 = int(rng.integers(margin, image_size - margin - side + 1))
                box = (x0, y0, x0 + side, y0 + side)
                if all(_separated(box, other.box, gap) for other in shapes):
                    placed = box
                    break
            if placed is not None:
                shapes.append(Shape(str(colour), str(kind), size, placed))
                break
    background_seed = int(rng.integers(2 ** 31))
    return Scene(tuple(shapes), image_size, background_seed)


def scene_for(seed: int, image_index: int, image_size: int = 96, max_shapes: int = MAX_SHAPES) -> Scene:
    """The scene of image ``image_index`` of the world ``seed`` (what SyntheticCaptions shows)."""
    return make_scene(rng_stream(seed, image_index, 0, 0), image_size, max_shapes)


def rng_stream(seed: int, image_index: int, stream: int, sub_index: int = 0) -> np.random.Generator:
    """Independent random stream per (seed, image, purpose, sub-index): stream 0 = scene,
    1 = caption number ``sub_index``. Other tasks built on this world should use stream >= 2."""
    if seed < 0 or image_index < 0:
        raise ValueError(f"seed and image index must be non-negative, got {seed}, {image_index}")
    return np.random.default_rng([seed, image_index, stream, sub_index])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: Tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = shape.box
    right, bottom = x1 - 1, y1 - 1  # ImageDraw's coordinates are inclusive; boxes are half-open
    if shape.kind == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, right, bottom), fill=fill)
    elif shape.kind == "triangle":  # apex up, base on the box's bottom edge
        draw.polygon([(x0, bottom), (right, bottom), ((x0 + right) / 2, y0)], fill=fill)
    elif shape.kind == "cross":  # a plus sign: two bars one third of the side thick
        third = (x1 - x0) / 3
        draw.rectangle((x0, round(y0 + third), right, round(y0 + 2 * third) - 1), fill=fill)
        draw.rectangle((round(x0 + third), y0, round(x0 + 2 * third) - 1, bottom), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; kinds are {KINDS}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB `PIL.Image` (deterministic: noise comes from ``background_seed``)."""
    rng = np.random.default_rng(scene.background_seed)
    size = scene.image_size
    background = tuple(int(v) for v in rng.integers(*BACKGROUND_LEVELS, size=3))
    canvas = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[shape.colour]) + jitter, 0, 255))
        _draw_shape(draw, shape, fill)
    # Noise over the whole image, in one vectorised step: texture on shapes and background alike.
    # float32 noise: half the cost of numpy's default float64, and 8-bit output needs no more.
    noise = rng.standard_normal(size=(size, size, 3), dtype=np.float32)
    pixels = np.asarray(canvas, dtype=np.float32) + noise * np.float32(NOISE_STD)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# ---- captions ------------------------------------------------------------------------------------

def relations(a: Shape, b: Shape) -> List[str]:
    """Every relation word that holds for "a <relation> b", judged by the boxes (strict: a is
    above b when a's bottom edge is at or above b's top edge)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    found = []
    if ay1 <= by0:
        found.append("above")
    if ay0 >= by1:
        found.append("below")
    if ax1 <= bx0:
        found.append("left of")
    if ax0 >= bx1:
        found.append("right of")
    return found


def relation(a: Shape, b: Shape) -> str:
    """The relation of a to b along the axis where they are farthest apart (what a person would
    say for shapes that are, say, mostly side by side but also slightly offset vertically)."""
    (ax, ay), (bx, by) = a.center, b.center
    found = relations(a, b)
    if not found:
        raise ValueError(f"shapes overlap, no relation holds: {a.box} and {b.box}")
    horizontal = [r for r in found if r in ("left of", "right of")]
    vertical = [r for r in found if r in ("above", "below")]
    if horizontal and vertical:
        return horizontal[0] if abs(ax - bx) >= abs(ay - by) else vertical[0]
    return found[0]


def describe(shape: Shape, with_size: bool = False) -> str:
    """"red circle" or "small red circle"."""
    return f"{shape.size} {shape.colour} {shape.kind}" if with_size else f"{shape.colour} {shape.kind}"


def _pick(scene: Scene, rng: np.random.Generator) -> Shape:
    return scene.shapes[int(rng.integers(len(scene.shapes)))]


def _with_size(rng: np.random.Generator) -> bool:
    return bool(rng.integers(2))


def _caption_single(scene: Scene, rng: np.random.Generator) -> Optional[str]:
    # "a red circle" / "there is a small blue square": one shape of the scene.
    shape = _pick(scene, rng)
    opening = "a" if rng.integers(2) else "there is a"
    return f"{opening} {describe(shape, _with_size(rng))}"


def _caption_list(scene: Scene, rng: np.random.Generator) -> Optional[str]:
    # "three shapes: a red circle, a small blue square and a green cross": the whole scene.
    order = rng.permutation(len(scene.shapes))
    parts = [f"a {describe(scene.shapes[i], _with_size(rng))}" for i in order]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(parts)
    return f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {listed}"


def _caption_relation(scene: Scene, rng: np.random.Generator) -> Optional[str]:
    # "a red circle above a blue square" / "the green cross is left of the small white triangle".
    if len(scene.shapes) < 2:
        return None
    i, j = rng.choice(len(scene.shapes), size=2, replace=False)
    a, b = scene.shapes[int(i)], scene.shapes[int(j)]
    rel = relation(a, b)
    if rng.integers(2):
        return f"a {describe(a, _with_size(rng))} {rel} a {describe(b, _with_size(rng))}"
    return f"the {describe(a, _with_size(rng))} is {rel} the {describe(b, _with_size(rng))}"


def _caption_colour_of_kind(scene: Scene, rng: np.random.Generator) -> Optional[str]:
    shape = _pick(scene, rng)  # "the circle is red"
    return f"the {shape.kind} is {shape.colour}"


def _caption_kind_of_colour(scene: Scene, rng: np.random.Generator) -> Optional[str]:
    shape = _pick(scene, rng)  # "the red shape is a circle"
    return f"the {shape.colour} shape is a {shape.kind}"


CaptionTemplate = Callable[[Scene, np.random.Generator], Optional[str]]
CAPTION_TEMPLATES: Dict[str, CaptionTemplate] = {
    "single": _caption_single,
    "list": _caption_list,
    "relation": _caption_relation,
    "colour_of_kind": _caption_colour_of_kind,
    "kind_of_colour": _caption_kind_of_colour,
}


def make_caption(scene: Scene, rng: np.random.Generator, template: Optional[str] = None) -> str:
    """A true caption of ``scene``: from ``template`` (a CAPTION_TEMPLATES name), or from a template
    drawn uniformly among those that apply (relations need two shapes)."""
    if template is not None:
        if template not in CAPTION_TEMPLATES:
            raise ValueError(f"unknown caption template {template!r}; choose from {list(CAPTION_TEMPLATES)}")
        caption = CAPTION_TEMPLATES[template](scene, rng)
        if caption is None:
            raise ValueError(f"template {template!r} does not apply to a scene of "
                             f"{len(scene.shapes)} shape(s)")
        return caption
    names = [n for n in CAPTION_TEMPLATES if n != "relation" or len(scene.shapes) >= 2]
    return CAPTION_TEMPLATES[names[int(rng.integers(len(names)))]](scene, rng)


# ---- vocabulary ----------------------------------------------------------------------------------

# Every word (and punctuation token) the caption templates above can produce.
CAPTION_WORDS: Tuple[str, ...] = (
    ("a", "the", "there", "is", "and", "shape", "shapes", "one", "two", "three", ":", ",")
    + ("above", "below", "left", "right", "of")
    + tuple(COLOURS) + KINDS + SIZES)
# Words of the fine-tuning tasks built on this world in synthetic_tasks.py (VQA: "what colour is the
# circle ?", "how many shapes are there ?"; NLVR2: "both images contain a red circle", "the left
# image has more shapes than the right image"). They are in the vocabulary from the start so that a
# model pre-trained on captions already has an embedding row for every fine-tuning word, at a
# fixed id. New words should replace [unused*] entries, never shift existing ids.
TASK_WORDS: Tuple[str, ...] = (
    "what", "which", "how", "many", "colour", "are", "yes", "no", "?", "image", "images", "both",
    "each", "in", "has", "contain", "contains", "more", "than", "fewer", "same",
    "zero", "four", "five", "six")
SYNTHETIC_WORDS: Tuple[str, ...] = CAPTION_WORDS + TASK_WORDS
SYNTHETIC_VOCAB_SIZE = 64  # = the tiny ModelConfig's vocab_size; [unused*] entries fill the rest


def colour_words() -> Tuple[str, ...]:
    """The colour names (for per-word-type MLM accuracy and attention checks)."""
    return tuple(COLOURS)


def shape_words() -> Tuple[str, ...]:
    """The shape-kind names."""
    return KINDS


def vocab_tokens(pad_to: Optional[int] = SYNTHETIC_VOCAB_SIZE) -> List[str]:
    """BERT-style vocabulary: the special tokens (ids 0-4, [PAD] = 0), then SYNTHETIC_WORDS, then
    ``[unused0]``, ``[unused1]``... up to ``pad_to`` entries (as BERT reserves unused ids), so the
    vocabulary size equals the model's ``vocab_size``. ``pad_to=None``: no padding."""
    tokens = list(SPECIAL_TOKENS) + list(SYNTHETIC_WORDS)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate word in the synthetic vocabulary")
    if pad_to is not None:
        if len(tokens) > pad_to:
            raise ValueError(f"the synthetic vocabulary has {len(tokens)} tokens, more than pad_to={pad_to}; "
                             "raise ModelConfig.vocab_size and pad_to together")
        tokens += [f"[unused{i}]" for i in range(pad_to - len(tokens))]
    return tokens


def write_vocab(path: str, pad_to: Optional[int] = SYNTHETIC_VOCAB_SIZE) -> str:
    """Write the synthetic vocab.txt (one token a line, id = line number) for WordPieceTokenizer."""
    return write_vocab_file(vocab_tokens(pad_to), path)


# ---- dataset -------------------------------------------------------------------------------------

class SyntheticCaptions(Dataset):
    """``num_images`` synthetic images with ``captions_per_image`` captions each, generated on the fly.

    Item ``index`` is caption ``index % captions_per_image`` of image ``index // captions_per_image``
    and has the same format as `pixel_bert.batches.CaptionDataset`:
    ``dict(image=Tensor(3, S, S) normalised, caption=str, image_key=str, index=int)``, so
    `pixel_bert.batches.CaptionCollator` batches it. ``transform`` defaults to an `ImageTransform`
    with ImageNet mean/std that keeps the size; pass ``ImageTransform.from_config(cfg)`` to match a
    config. Same ``seed`` -> same images and captions; a different seed -> a different world.
    """

    def __init__(self, num_images: int, seed: int, image_size: int = 96, captions_per_image: int = 1,
                 transform: Optional[ImageTransform] = None, max_shapes: int = MAX_SHAPES):
        if num_images < 0 or captions_per_image < 1:
            raise ValueError(f"need num_images >= 0 and captions_per_image >= 1, got {num_images}, "
                             f"{captions_per_image}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_images = num_images
        self.seed = seed
        self.image_size = image_size
        self.captions_per_image = captions_per_image
        self.max_shapes = max_shapes
        self.transform = transform or ImageTransform(image_size, image_size, IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return self.num_images * self.captions_per_image

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"SyntheticCaptions index {index} out of range 0..{len(self) - 1}")
        return int(index)

    def image_index(self, index: int) -> int:
        """The image shown by item ``index``."""
        return self._check(index) // self.captions_per_image

    def image_key(self, index: int) -> str:
        return f"synthetic{self.seed}:{self.image_index(index)}"

    def scene(self, index: int) -> Scene:
        """The scene (shapes and boxes) of item ``index`` (a dataset index, like ``item["index"]``)."""
        return scene_for(self.seed, self.image_index(index), self.image_size, self.max_shapes)

    def image(self, index: int) -> Image.Image:
        """The un-normalised PIL image of item ``index``."""
        return render(self.scene(index))

    def caption(self, index: int) -> str:
        index = self._check(index)
        image_index, caption_index = divmod(index, self.captions_per_image)
        return make_caption(self.scene(index), rng_stream(self.seed, image_index, 1, caption_index))

    def __getitem__(self, index: int) -> Dict[str, object]:
        index = self._check(index)
        scene = self.scene(index)
        image_index, caption_index = divmod(index, self.captions_per_image)
        caption = make_caption(scene, rng_stream(self.seed, image_index, 1, caption_index))
        return dict(image=self.transform(render(scene)), caption=caption,
                    image_key=self.image_key(index), index=index)


# ---- COCO-format export --------------------------------------------------------------------------

def write_coco_format(out_dir: str, num_images: int, seed: int, image_size: int = 96,
                      captions_per_image: int = 1) -> str:
    """Write the synthetic world as a COCO captions dataset and return the json's path.

    ``out_dir/images/{id:06d}.png`` and ``out_dir/captions_train2014.json`` in the official format
    (``images[{id, file_name, height, width}]``, ``annotations[{id, image_id, caption}]``), with the
    same images and captions as ``SyntheticCaptions(num_images, seed, image_size, captions_per_image)``
    (COCO image id = image index), so `pixel_bert.annotations.read_coco_captions(json, out_dir/"images")`
    reads it back. It exercises the real-data path end to end.
    """
    dataset = SyntheticCaptions(num_images, seed, image_size, captions_per_image)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_index in range(num_images):
        first = image_index * captions_per_image
        file_name = f"{image_index:06d}.png"
        dataset.image(first).save(os.path.join(image_dir, file_name))
        images.append(dict(id=image_index, file_name=file_name, height=image_size, width=image_size))
        for index in range(first, first + captions_per_image):
            annotations.append(dict(id=len(annotations), image_id=image_index, caption=dataset.caption(index)))
    info = dict(description=f"pixel_bert synthetic shapes, seed {seed}", version="1.0")
    path = os.path.join(out_dir, "captions_train2014.json")
    return write_json(path, dict(info=info, images=images, annotations=annotations), indent=None)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pixel_bert.synthetic",
        description="Write the synthetic shapes world as a COCO captions dataset (images/*.png, "
                    "captions_train2014.json) plus the BERT-style vocab.txt that reads its captions.")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--num-images", type=int_at_least(1), default=1000, help="number of images (default 1000)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="world seed; same seed, same data (default 0)")
    parser.add_argument("--image-size", type=int_at_least(8), default=96, help="image side in pixels (default 96)")
    add_debug_argument(parser)
    parser.add_argument("--captions-per-image", type=int_at_least(1), default=1,
                        help="captions written per image (default 1)")
    args = parser.parse_args(argv)
    json_path = write_coco_format(args.out, args.num_images, args.seed, args.image_size,
                                  args.captions_per_image)
    vocab_path = write_vocab(os.path.join(args.out, "vocab.txt"))
    print(f"wrote {args.num_images} images and {json_path}; vocabulary {vocab_path}")


if __name__ == "__main__":
    run_cli(main)
