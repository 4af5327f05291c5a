"""Retrieval evaluation throughput (docs/paper.md#evaluation-protocols): the full evaluation with the visual
feature cache (pixel_bert.retrieval_scoring.evaluate_retrieval: the CNN once per image, then every pair
scored by the transformer) against running the CNN again for every pair (score_pairs_uncached).

    python benchmarks/retrieval_throughput.py                   # CPU: r50 config, 1 image x 64 captions
    python benchmarks/retrieval_throughput.py --device cuda --images 64 --captions 320 --uncached-pairs 128 --warmup 1

The model is the r50 preset (ResNet-50 + BERT-base, random weights: speed does not depend on them)
on COCO-sized photos (640x480 JPEGs, resized to 800x1067: 13x17 = 221 feature pixels) and captions
of 8-20 words. Reported: pairs/s of the full evaluation, of its scoring part alone (transformer
only) and without the cache; the speed-up next to the one FLOP counts predict; the CNN's share of
the evaluation here and at Flickr30K (5,000 captions per image) and COCO 5K (25,000) scale; and
the hours Flickr30K 1K x 5K (5M pairs) and COCO 5K x 25K (125M pairs) take on 8 devices like
this one, from the measured per-image (JPEG decode + resize + CNN) and per-pair times. On CPU use
few images and captions: the per-pair figures are what the projections need, and the CNN's share
at this size (1 image x 64 captions by default) shows how little it weighs once an image meets
many captions.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from common import (add_common_args, count_flops, machine, print_table, random_captions, setup, sync, write_json,
                    write_photos)
from pixel_bert import retrieval_scoring, synthetic
from pixel_bert.config import make_model_config
from pixel_bert.distributed import DistInfo
from pixel_bert.heads import PixelBertForRetrieval
from pixel_bert.images import ImageTransform, pad_images
from pixel_bert.precision import eval_autocast
from pixel_bert.tokenizer import WordPieceTokenizer

DATASETS = {"Flickr30K 1K x 5K": (1000, 5000), "COCO 5K x 25K": (5000, 25000)}  # images, captions


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="r50", help="model preset (default r50)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default: the preset's)")
    p.add_argument("--images", type=int, default=1, help="images (rows of the score matrix) (default 1)")
    p.add_argument("--captions", type=int, default=64, help="captions (columns) (default 64)")
    p.add_argument("--photo", default="640x480", help="JPEG size WxH (default 640x480, COCO's)")
    p.add_argument("--pairs-per-batch", type=int, default=1024, help="pairs per forward pass (default 1024)")
    p.add_argument("--image-batch", type=int, default=16, help="images per CNN batch (default 16)")
    p.add_argument("--uncached-pairs", type=int, default=2, help="pairs timed without the cache (default 2)")
    p.add_argument("--devices", type=int, default=8, help="devices in the projection (default 8, the paper's)")
    return add_common_args(p, repeat=None, warmup=0, warmup_help="whole evaluations run untimed first "
                           "(default 0; one image and one pair always are)")


def build(args, device, folder):
    overrides = dict(backbone_weights=None, bert_weights=None)
    if args.layers:
        overrides["num_layers"] = args.layers
    cfg = make_model_config(args.preset, **overrides)
    model = PixelBertForRetrieval(cfg).to(device).eval()
    w, h = map(int, args.photo.split("x"))
    paths = write_photos(f"{folder}/images", [(w, h)] * args.images)
    captions = random_captions(args.captions, 8, 20)
    split = retrieval_scoring.RetrievalSplit(paths, list(range(args.images)), captions, list(range(args.captions)),
                                     np.arange(args.captions) % args.images, "benchmark")
    tokenizer = WordPieceTokenizer(synthetic.write_vocab(f"{folder}/vocab.txt"))
    return cfg, model, split, tokenizer, ImageTransform.from_config(cfg)


def flops_per_image_and_pair(model, split, tokenizer, transform, cfg, device):
    """FLOPs of the CNN on one image and of the transformer on one pair (a mean-length caption)."""
    image, mask = pad_images([transform.load(split.image_paths[0])])
    image, mask = image.to(device), mask.to(device)
    text = tokenizer(split.captions, max_length=cfg.max_text_len)
    ids = text.input_ids[:1, : int(text.attention_mask.sum(1).float().mean().round())].to(device)
    with torch.no_grad(), eval_autocast(device):
        cnn = count_flops(lambda: model.bert.encode_image(image, mask))
        visual = model.bert.encode_image(image, mask)
        pair = count_flops(lambda: model(ids, None, visual=visual))
    return cnn, pair


def warm_up(model, split, tokenizer, transform, cfg, device):
    """One image through the CNN and one pair through the transformer, untimed: the first calls set up
    kernels (oneDNN primitives, cuDNN autotuning) that would otherwise be charged to the CNN."""
    image, mask = pad_images([transform.load(split.image_paths[0])])
    text = tokenizer(split.captions[:1], max_length=cfg.max_text_len)
    with torch.no_grad(), eval_autocast(device):
        model(text.input_ids.to(device), text.attention_mask.to(device), image.to(device), mask.to(device))


def uncached_rate(model, split, tokenizer, transform, cfg, device, n_pairs):
    """pairs/s of score_pairs_uncached (the CNN per pair) on the first ``n_pairs`` pairs."""
    images, mask = pad_images([transform.load(p) for p in split.image_paths])
    text = tokenizer(split.captions, max_length=cfg.max_text_len)
    n_img = max(1, -(-n_pairs // len(split.captions)))
    cols = min(n_pairs, len(split.captions))
    def run():
        return retrieval_scoring.score_pairs_uncached(model, images[:n_img], mask[:n_img], text.input_ids[:cols],
                                              text.attention_mask[:cols], device, pairs_per_batch=64)
    if device.type == "cuda":  # warm-up: cuDNN's autotuning
        run()
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return n_img * cols / (time.perf_counter() - start)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = setup(args)
    with tempfile.TemporaryDirectory() as folder:
        cfg, model, split, tokenizer, transform = build(args, device, folder)
        info = DistInfo(device=device)
        run = lambda: retrieval_scoring.evaluate_retrieval(  # noqa: E731
            model, split, tokenizer, transform, cfg.max_text_len, info, image_batch_size=args.image_batch,
            pairs_per_batch=args.pairs_per_batch, log=lambda *_: None)
        warm_up(model, split, tokenizer, transform, cfg, device)
        for _ in range(args.warmup):
            run()
        sync(device)
        start = time.perf_counter()
        stats = run()["stats"]
        total = time.perf_counter() - start
        f_cnn, f_pair = flops_per_image_and_pair(model, split, tokenizer, transform, cfg, device)
        uncached = uncached_rate(model, split, tokenizer, transform, cfg, device, args.uncached_pairs)
    pairs, n_img, n_cap = stats["pairs"], args.images, args.captions
    t_image, t_pair = stats["cnn_seconds"] / n_img, stats["score_seconds"] / pairs
    full_rate, scoring_rate = pairs / total, pairs / stats["score_seconds"]
    rows = [{"path": "full evaluation (cache)", "pairs_s": full_rate},
            {"path": "scoring alone (transformer)", "pairs_s": scoring_rate},
            {"path": "CNN for every pair", "pairs_s": uncached}]
    predicted = (f_cnn + f_pair) / (f_cnn / n_cap + f_pair)
    projections = []
    for name, (images, captions) in DATASETS.items():
        cached_s = images * t_image + images * captions * t_pair
        projections.append({"dataset": name, "pairs": images * captions,
                            "cnn_share": images * t_image / cached_s,
                            "hours_cache": cached_s / args.devices / 3600,
                            "hours_cnn_per_pair": images * captions / uncached / args.devices / 3600})
    print(f"{args.preset} ({cfg.backbone}, {cfg.num_layers} x {cfg.hidden_size}) on {device}, "
          f"{torch.get_num_threads()} threads; {n_img} images ({args.photo} JPEGs) x {n_cap} captions = {pairs} pairs")
    print_table(rows, ["path", "pairs_s"])
    print(f"images (decode + CNN): {1000 * t_image:.1f} ms per image, {100 * stats['cnn_seconds'] / total:.1f}% of "
          f"this evaluation; scoring: {1000 * t_pair:.2f} ms per pair; full / scoring-only rate "
          f"{full_rate / scoring_rate:.3f}")
    print(f"speed-up of the cache here: measured {full_rate / uncached:.1f}x, FLOP counts predict {predicted:.1f}x "
          f"(CNN {f_cnn / 1e9:.3g} GFLOP per image, scoring {f_pair / 1e9:.3g} GFLOP per pair, {n_cap} captions "
          "per image)")
    print_table(projections, ["dataset", "pairs", "cnn_share", "hours_cache", "hours_cnn_per_pair"],
                f"\nprojected on {args.devices} devices like this one")
    result = {"benchmark": "retrieval", "machine": machine(device), "preset": args.preset, "images": n_img,
              "captions": n_cap, "pairs": pairs, "seconds": total, "cnn_seconds": stats["cnn_seconds"],
              "score_seconds": stats["score_seconds"], "rows": rows, "full_over_scoring": full_rate / scoring_rate,
              "speedup_measured": full_rate / uncached, "speedup_predicted": predicted, "gflop_cnn_per_image":
              f_cnn / 1e9, "gflop_per_pair": f_pair / 1e9, "projections": projections}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
