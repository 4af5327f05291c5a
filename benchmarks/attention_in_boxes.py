"""Does a colour word attend to its shape? Attention-in-box ratios per layer (Sec. 4.4 of the paper).

    python benchmarks/attention_in_boxes.py --checkpoint /tmp/pre5/model.pt --num-images 200 --seed 12345

For held-out synthetic images (``--seed`` must differ from the training world's: train.py trains on
seed 0 and evaluates on seed 1), each caption is "a red circle" / "there is a small red circle"
(the dataset's "single" template). The colour word's attention over the feature pixels
(renormalised over the pixels) is scored against its shape's box:

    ratio = (attention mass inside the box) / (the box's share of the image area)

computed on the feature grid, each cell counting with the fraction of its area inside the box
(`attention_in_box_ratio` below). 1.0 = no better than uniform. Printed for every
layer with heads averaged, for each head, and for a control: the same map scored against a
*different* shape of the same image (images with 2+ shapes), with the paired t statistic of
own - other over those images (above ~3: the word finds its own shape beyond chance).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import numpy as np  # noqa: E402

from pixel_bert import synthetic  # noqa: E402
from pixel_bert.inference import PixelBertPredictor  # noqa: E402


# -------------------------------------------------------------------------------------------------

def box_cell_weights(box: Tuple[float, float, float, float], image_size: Tuple[int, int],
                     grid: Tuple[int, int]) -> np.ndarray:
    """(gh, gw) fraction of each feature cell's area that lies inside ``box`` = (x0, y0, x1, y1)
    in pixels of an image of ``image_size`` = (width, height), the grid stretched over the image.

    The overlap is separable: the fraction of a cell inside the box is (its x-overlap with the
    box / cell width) * (its y-overlap / cell height), one outer product, no loop over cells.
    """
    (W, H), (gh, gw) = image_size, grid
    x0, y0, x1, y1 = box

    def overlap(lo, hi, size, n):
        edges = np.arange(n + 1) * (size / n)                  # cell edges along this axis
        inside = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)
        return inside / (size / n)                             # (n,) in [0, 1]

    return np.outer(overlap(y0, y1, H, gh), overlap(x0, x1, W, gw))


def attention_in_box_ratio(attention: Union[torch.Tensor, np.ndarray], box, image_size, grid=None) -> float:
    """(attention mass inside ``box``) / (the box's share of the image area), from a (gh, gw) map.

    The map is normalised to sum 1 here (so raw and renormalised maps give the same ratio); cells
    count with the fraction of their area inside the box (`box_cell_weights`). Because the cells
    tile the image, the box's area share is exactly mean(weights): a uniform map scores 1.0, a map
    that attends only inside the box scores 1 / area share.
    """
    a = np.asarray(attention, dtype=np.float64)
    weights = box_cell_weights(box, image_size, a.shape if grid is None else grid)
    inside = float((a * weights).sum() / a.sum())
    return inside / float(weights.mean())


@dataclass
class BoxAttentionResult:
    """Mean attention-in-box ratios over held-out synthetic images (see `colour_attention_in_boxes`).

    per_layer: layer -> mean ratio for the colour word's own shape (heads averaged);
    per_layer_other: layer -> mean ratio of the same maps for a *different* shape of the same image
        (the control: a word that looks at its own shape scores higher on it than on the other;
        attention that ignores the word, e.g. to every bright shape, scores both alike);
    paired_t: layer -> t statistic of the per-image difference own - other over the images with
        2+ shapes (mean / standard error): above ~3 the own shape wins beyond chance;
    per_layer_head: layer -> list of per-head mean ratios (own shape);
    num_pairs / num_pairs_other: images scored / images with a second shape.
    """
    per_layer: Dict[int, float]
    per_layer_other: Dict[int, float]
    paired_t: Dict[int, float]
    per_layer_head: Dict[int, List[float]]
    num_pairs: int
    num_pairs_other: int
    grid: Tuple[int, int]
    image_size: int


def colour_attention_in_boxes(predictor: PixelBertPredictor, num_images: int = 200, seed: int = 12345,
                              batch_size: int = 50) -> BoxAttentionResult:
    """Does the colour word of a caption attend to its shape? (evidence for Sec. 4.4 of the paper)

    For ``num_images`` synthetic scenes of the world ``seed`` (pick a seed the model was not trained
    on: train.py trains on ``--synthetic-seed`` (0) and holds out seed+1), each caption is the
    "single" template ("a red circle" / "there is a small red circle", the dataset's own caption
    generator). The colour word's map (renormalised over pixels, heads averaged, and per head) is
    scored with `attention_in_box_ratio` against its shape's box, and, as a control, against the
    box of another shape in the same image when there is one. Means over images, for every layer.
    """
    size = predictor.config.image_short_side
    colours = set(synthetic.colour_words())
    scenes, texts, boxes, other_boxes = [], [], [], []
    for i in range(num_images):
        scene = synthetic.scene_for(seed, i, size)
        # caption stream of the same (seed, image): exactly what SyntheticCaptions would write
        caption = synthetic.make_caption(scene, synthetic.rng_stream(seed, i, 1, 0), "single")
        colour = next(w for w in caption.split() if w in colours)
        shape = scene.find(colour=colour)
        others = [s for s in scene.shapes if s is not shape]
        scenes.append(scene)
        texts.append(caption)
        boxes.append((colour, shape.box))
        other_boxes.append(others[0].box if others else None)
    L, nh = predictor.config.num_layers, predictor.config.num_heads
    own = {l: [] for l in range(L)}
    other = {l: [] for l in range(L)}
    diff = {l: [] for l in range(L)}
    per_head = {l: [[] for _ in range(nh)] for l in range(L)}
    grid = None
    for start in range(0, num_images, batch_size):
        chunk = range(start, min(start + batch_size, num_images))
        images = [synthetic.render(scenes[i]) for i in chunk]
        out, ids, mask, sizes = predictor._forward_attentions(images, [texts[i] for i in chunk])
        for layer in range(L):
            heads = [predictor._maps_from(out, ids, mask, sizes, layer, h, True) for h in range(nh)]
            mean = predictor._maps_from(out, ids, mask, sizes, layer, None, True)
            for j, i in enumerate(chunk):
                colour, box = boxes[i]
                word_map = mean[j].map_for(colour)
                grid = mean[j].grid
                own[layer].append(attention_in_box_ratio(word_map, box, (size, size)))
                if other_boxes[i] is not None:
                    other[layer].append(attention_in_box_ratio(word_map, other_boxes[i], (size, size)))
                    diff[layer].append(own[layer][-1] - other[layer][-1])
                k = mean[j].index(colour)
                for h in range(nh):
                    per_head[layer][h].append(attention_in_box_ratio(heads[h][j].maps[k], box, (size, size)))

    def t_stat(values):
        v = np.asarray(values, dtype=np.float64)
        if len(v) < 2:
            return float("nan")
        return float(v.mean() / max(v.std(ddof=1) / np.sqrt(len(v)), 1e-12))

    return BoxAttentionResult(
        per_layer={l: float(np.mean(v)) for l, v in own.items()},
        per_layer_other={l: float(np.mean(v)) for l, v in other.items()},
        paired_t={l: t_stat(v) for l, v in diff.items()},
        per_layer_head={l: [float(np.mean(h)) for h in v] for l, v in per_head.items()},
        num_pairs=num_images, num_pairs_other=len(other[0]), grid=grid, image_size=size)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (train.py's model.pt)")
    p.add_argument("--num-images", type=int, default=200, help="held-out images scored (default 200)")
    p.add_argument("--seed", type=int, default=12345, help="world seed of the held-out images (default 12345)")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    started = time.time()
    predictor = PixelBertPredictor.from_checkpoint(args.checkpoint, device=args.device)
    r = colour_attention_in_boxes(predictor, args.num_images, args.seed, args.batch_size)
    cfg = predictor.config
    print(f"checkpoint {args.checkpoint}: {cfg.num_layers} layers x {cfg.num_heads} heads, "
          f"hidden {cfg.hidden_size}, images {r.image_size}px -> {r.grid[0]}x{r.grid[1]} feature grid")
    print(f"{r.num_pairs} held-out images (seed {args.seed}); colour word -> own shape's box; "
          f"control: another shape of the same image ({r.num_pairs_other} images)")
    print("ratio = attention mass in box / box area share (1.0 = uniform)\n")
    heads = " ".join(f"{'head ' + str(h):>7}" for h in range(cfg.num_heads))
    print(f"{'layer':>5} {'mean-of-heads':>14} {'control':>8} {'paired t':>9}   {heads}")
    for layer in sorted(r.per_layer):
        per_head = " ".join(f"{v:7.2f}" for v in r.per_layer_head[layer])
        print(f"{layer:>5} {r.per_layer[layer]:14.2f} {r.per_layer_other[layer]:8.2f} "
              f"{r.paired_t[layer]:9.2f}   {per_head}")
    best = max(r.per_layer, key=r.per_layer.get)
    print(f"\nbest layer (heads averaged): {best} (ratio {r.per_layer[best]:.2f}); "
          f"layer 0: {r.per_layer[0]:.2f}   [{time.time() - started:.1f} s]")
    return r


if __name__ == "__main__":
    main()
