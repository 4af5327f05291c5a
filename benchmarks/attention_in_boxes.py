"""Does a colour word attend to its shape? Attention-in-box ratios per layer (Sec. 4.4 of the paper).

    python benchmarks/attention_in_boxes.py --checkpoint /tmp/pre5/model.pt --num-images 200 --seed 12345

For held-out synthetic images (``--seed`` must differ from the training world's: train.py trains on
seed 0 and evaluates on seed 1), each caption is "a red circle" / "there is a small red circle"
(the dataset's "single" template). The colour word's attention over the feature pixels
(renormalised over the pixels) is scored against its shape's box:

    ratio = (attention mass inside the box) / (the box's share of the image area)

computed on the feature grid, each cell counting with the fraction of its area inside the box
(`pixel_bert.inference.attention_in_box_ratio`). 1.0 = no better than uniform. Printed for every
layer with heads averaged, for each head, and for a control: the same map scored against a
*different* shape of the same image (images with 2+ shapes), with the paired t statistic of
own - other over those images (above ~3: the word finds its own shape beyond chance).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pixel_bert.inference import PixelBertPredictor, colour_attention_in_boxes  # noqa: E402


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
