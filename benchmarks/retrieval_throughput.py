"""Retrieval evaluation throughput (docs/paper.md#evaluation-protocols): pairs scored per second with the
visual-feature cache (the CNN runs once per image, pixel_bert.retrieval.evaluate_retrieval) and
without it (the CNN runs again for every image-caption pair, retrieval.score_pairs_uncached).

    python benchmarks/retrieval_throughput.py                      # tiny model, CPU
    python benchmarks/retrieval_throughput.py --hidden-size 256 --layers 4 --image-size 96

Prints the figures; asserts nothing. The model is randomly initialised (speed does not depend on
the weights); images and captions come from the synthetic retrieval data (Karpathy format).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pixel_bert import retrieval, synthetic, synthetic_tasks  # noqa: E402
from pixel_bert.config import make_model_config  # noqa: E402
from pixel_bert.data import ImageTransform, load_image, pad_images  # noqa: E402
from pixel_bert.engine import DistInfo  # noqa: E402
from pixel_bert.heads import PixelBertForRetrieval  # noqa: E402
from pixel_bert.tokenizer import WordPieceTokenizer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40, help="test images (rows of the score matrix)")
    p.add_argument("--captions-per-image", type=int, default=5, help="captions per image (columns = images x this)")
    p.add_argument("--image-size", type=int, default=80, help="image side in pixels")
    p.add_argument("--hidden-size", type=int, default=128, help="transformer width")
    p.add_argument("--layers", type=int, default=4, help="transformer layers")
    p.add_argument("--backbone-stages", type=int, default=2, help="ResNet-18 stages kept (tiny model: 2)")
    p.add_argument("--pairs-per-batch", type=int, default=1024, help="pairs per forward pass with the cache")
    p.add_argument("--uncached-pairs", type=int, default=1000, help="pairs timed without the cache (it is slow; "
                   "its rate is measured on this many pairs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = make_model_config("tiny", hidden_size=args.hidden_size, num_layers=args.layers,
                            intermediate_size=4 * args.hidden_size, backbone_stages=args.backbone_stages,
                            image_short_side=args.image_size, image_long_side=args.image_size)
    model = PixelBertForRetrieval(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_tasks.write_retrieval(tmp, 0, 0, args.images, image_size=args.image_size,
                                               captions_per_image=args.captions_per_image)
        split = retrieval.read_karpathy_eval(path, tmp, "test")
        tok = WordPieceTokenizer(synthetic.write_vocab(os.path.join(tmp, "vocab.txt")))
        transform = ImageTransform.from_config(cfg)
        n_pairs = len(split.image_paths) * len(split.captions)

        t0 = time.time()
        out = retrieval.evaluate_retrieval(model, split, tok, transform, cfg.max_text_len, DistInfo(),
                                           pairs_per_batch=args.pairs_per_batch, log=lambda *_: None)
        cached_total = time.time() - t0
        st = out["stats"]

        images, mask = pad_images([transform(load_image(x)) for x in split.image_paths])
        text = tok(split.captions, max_length=cfg.max_text_len)
        n_un = min(args.uncached_pairs, n_pairs)
        rows = torch.arange(n_un) // len(split.captions)
        cols = torch.arange(n_un) % len(split.captions)
        t1 = time.time()
        with torch.no_grad():
            for s in range(0, n_un, 64):  # what score_pairs_uncached does, on a subset of the pairs
                r, c = rows[s:s + 64], cols[s:s + 64]
                model(text.input_ids[c], text.attention_mask[c], images[r], mask[r])
        uncached = time.time() - t1

    print(f"model: resnet18 trunk ({args.backbone_stages} stages) + {args.layers}x{args.hidden_size} transformer, "
          f"{args.image_size}px images, {torch.get_num_threads()} CPU threads")
    print(f"score matrix {len(split.image_paths)} images x {len(split.captions)} captions = {n_pairs} pairs")
    print(f"with feature cache:    {n_pairs / cached_total:9.0f} pairs/s overall ({cached_total:.2f} s: CNN "
          f"{st['cnn_seconds']:.2f} s once per image, scoring {st['score_seconds']:.2f} s = "
          f"{st['pairs_per_second']:.0f} pairs/s)")
    print(f"without (CNN per pair): {n_un / uncached:9.0f} pairs/s (measured on {n_un} pairs, {uncached:.2f} s)")
    print(f"speed-up: {(n_pairs / cached_total) / (n_un / uncached):.1f}x")


if __name__ == "__main__":
    main()
