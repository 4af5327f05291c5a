"""A whole pre-training step: CNN + transformer + MLM/ITM heads + both optimisers (docs/paper.md#pre-training).

    python benchmarks/step.py                                       # CPU: tiny, and r50 at 600x1000, batch 1
    python benchmarks/step.py --device cuda --presets r50 --batch 64 --sizes 600x1000,800x1333 --dtype bf16

The step is the training loop's (pixel_bert.train.pretrain_step under autocast, backward,
gradient clipping, SGD for the CNN + AdamW for the rest, all taken by trainer.Trainer) on a batch
collated from COCO-sized JPEGs (640x480 photos, resized to the preset's or --sizes' short/long
side). Models start from random weights (nothing downloads). Per setting (image size x pixels
kept x CNN activation checkpointing): samples/s, model TFLOP/s and its share of a large matmul,
peak memory (CUDA: max_memory_allocated; CPU: the peak of what the step allocates on top of the
weights and optimizer state, from torch.profiler's allocation events).

For the first setting of each preset, where the time goes:
- sections, timed apart with the graph cut between them: data (decode + resize + collate of one
  batch in one process), host-to-device copy, CNN, transformer, heads (masking, MLM/ITM, losses;
  forward + backward each) and optimizer (clip + both steps);
- operators (torch.profiler, self time) of each section by kind: convolutions, matmuls, attention
  and the rest, and the share of the step outside the CNN, attention and matmuls.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from typing import Optional

import torch

from common import (DTYPES, add_common_args, autocast, count_flops, csv_list, machine, matmul_flops,
                    operators_by_section, peak_memory, print_table, random_captions, setup, sync, time_runs,
                    write_json, write_photos)
from pixel_bert import synthetic
from pixel_bert.annotations import CaptionRecord
from pixel_bert.batches import CaptionCollator, CaptionDataset
from pixel_bert.config import make_model_config, make_train_config
from pixel_bert.distributed import DistInfo
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.images import ImageTransform
from pixel_bert.losses import pretrain_losses
from pixel_bert.model import VisualTokens
from pixel_bert.tokenizer import WordPieceTokenizer
from pixel_bert.train import prepare_pretrain_batch, pretrain_step
from pixel_bert.trainer import EpochStats, Trainer


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,r50", help="model presets (default tiny,r50)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: 8 for tiny, 1 otherwise)")
    p.add_argument("--sizes", default="600x1000", help="SHORTxLONG image sides for r50/x152; tiny keeps its "
                   "64x64 (default 600x1000; the paper: 800x1333 for r50, 600x1000 for x152)")
    p.add_argument("--pixels", default="sampled,all", help="visual tokens kept: 'sampled' (the preset's "
                   "num_sampled_pixels: 100, as pre-training) and/or 'all' (default both)")
    p.add_argument("--checkpointing", default="off,on", help="CNN activation checkpointing settings for "
                   "r50/x152 (default off,on; tiny trains its BatchNorm, which excludes it)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default: the preset's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--unfused-optimizers", action="store_true", help="AdamW and SGD as a loop over parameters "
                   "(TrainConfig.fused_optimizers=False), to compare with the default fused kernels")
    p.add_argument("--no-breakdown", action="store_true", help="skip the section and operator breakdowns")
    return add_common_args(p, repeat=3)


AMP_SETTING = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}  # --dtype -> TrainConfig.amp


class Setup:
    """A model, its optimisers and a collated batch (already on the device) for one setting."""

    def __init__(self, preset, size, pixels, checkpointing, args, device, dtype, folder):
        # checkpointing on/off: recomputation of the CNN blocks and the transformer layers alike (the
        # paper's presets turn both on); the frozen stages stay as the preset has them
        overrides = dict(backbone_weights=None, bert_weights=None, backbone_checkpointing=checkpointing,
                         gradient_checkpointing=checkpointing)
        if preset != "tiny":
            overrides.update(image_short_side=size[0], image_long_side=size[1])
        if args.layers:
            overrides["num_layers"] = args.layers
        self.cfg = make_model_config(preset, **overrides)
        self.train_cfg = make_train_config("pretrain", sample_pixels=pixels == "sampled", num_workers=0,
                                           amp=AMP_SETTING[dtype], compile=bool(args.compile),
                                           fused_optimizers=not getattr(args, "unfused_optimizers", False))
        self.model = PixelBertForPreTraining(self.cfg).to(device).train()
        self.device, self.dtype = device, dtype
        self.tokenizer = WordPieceTokenizer(synthetic.write_vocab(f"{folder}/vocab.txt"))
        batch = args.batch or (8 if preset == "tiny" else 1)
        paths = write_photos(f"{folder}/images", [(640, 480)] * batch)
        captions = random_captions(batch, 10, 38)  # 12..40 tokens with [CLS] and [SEP]
        records = [CaptionRecord(p, c, f"img{i}") for i, (p, c) in enumerate(zip(paths, captions))]
        self.dataset = CaptionDataset(records, ImageTransform.from_config(self.cfg))
        self.collate = CaptionCollator(self.tokenizer, self.cfg.max_text_len)
        self.host_batch = self.load_batch()
        self.batch = self.to_device()
        # The training loop's own Trainer takes the steps: micro_batch (autocast, loss scaling,
        # backward) and optimizer_step (unscale, clip, the finiteness vote, both optimisers, schedule).
        self.trainer = Trainer(self.model, self.train_cfg, tempfile.mkdtemp(dir=folder), self.dataset, self.collate,
                               lambda epoch: [list(range(len(self.dataset)))],
                               lambda m, b, step: pretrain_step(m, b, self.tokenizer, self.train_cfg, device),
                               DistInfo(device=device), run_config={})
        self.forward_model, self.scaler = self.trainer.model, self.trainer.scaler

    def load_batch(self):
        return self.collate([self.dataset[i] for i in range(len(self.dataset))])

    def to_device(self):
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in self.host_batch.items()}

    def step(self):
        """One optimizer step, taken by trainer.Trainer as in training."""
        stats = EpochStats()
        self.trainer.micro_batch(self.batch, stats)
        self.trainer.optimizer_step(stats)

    def model_flops(self) -> int:
        """FLOPs of one step, counted without the CNN's recomputation (model FLOPs)."""
        backbone = self.model.bert.visual_embedding.backbone
        recompute, backbone.checkpointing = backbone.checkpointing, False
        try:
            return count_flops(self.step)
        finally:
            backbone.checkpointing = recompute

    def optimizer_step(self):
        """trainer.Trainer.optimizer_step on the gradients already there."""
        self.trainer.optimizer_step(EpochStats())

    def sectioned_step(self, timed):
        """One step cut into sections, each run as ``timed(name, fn)``: the graph is cut between them
        (detached leaves), so each backward part runs on its own. Sections: data (decode + collate of
        one batch in this process), h2d, cnn, transformer, heads (masking, MLM/ITM, losses), optimizer."""
        m, b, dev = self.model, self.batch, self.device
        sample = self.cfg.num_sampled_pixels if self.train_cfg.sample_pixels else 0
        timed("data", self.load_batch)
        timed("h2d", self.to_device)
        with autocast(dev, self.dtype):
            ids, mask, mlm_labels, itm_labels = timed("heads", lambda: [t.to(dev) for t in prepare_pretrain_batch(
                b, self.tokenizer, self.train_cfg, self.cfg.vocab_size)[:4]])
            v = timed("cnn", lambda: m.bert.encode_image(b["images"], b["pixel_mask"], sample))
            v_leaf = v.embeddings.detach().requires_grad_()
            visual = VisualTokens(v_leaf, v.mask, v.positions, v.grid)
            out = timed("transformer", lambda: m.bert(ids, mask, visual=visual))
            h_leaf = out.hidden.detach().requires_grad_()
            losses = timed("heads", lambda: pretrain_losses(m.mlm(h_leaf[:, :out.text_len]), mlm_labels,
                                                            m.itm(h_leaf[:, 0]), itm_labels))
        timed("heads", lambda: self.scaler.scale(losses["loss"]).backward())
        timed("transformer", lambda: out.hidden.backward(h_leaf.grad))
        timed("cnn", lambda: v.embeddings.backward(v_leaf.grad))
        timed("optimizer", self.optimizer_step)

    def section_seconds(self, args) -> dict:
        """Mean seconds per step of each section (forward and backward parts summed)."""
        times = {k: 0.0 for k in SECTIONS}

        def timed(key, fn):
            sync(self.device)
            start = time.perf_counter()
            out = fn()
            sync(self.device)
            times[key] += time.perf_counter() - start
            return out
        for _ in range(args.warmup):
            self.sectioned_step(lambda key, fn: fn())
        for _ in range(args.repeat):
            self.sectioned_step(timed)
        return {k: v / args.repeat for k, v in times.items()}

    def operators(self) -> dict:
        """Operator self time of one sectioned step by section and kind (common.operators_by_section)."""
        return operators_by_section(self.sectioned_step, self.device, exclude=("data",), within=("cnn",))


SECTIONS = ("data", "h2d", "cnn", "transformer", "heads", "optimizer")


def measure(s: Setup, args, device, flops: Optional[int] = None) -> dict:
    """ms and samples/s per step (median), model FLOPs (counted unless given or compiled) and peak
    memory of one setting. Its first step runs untimed: the optimisers allocate their state there."""
    s.step()
    flops = flops or (None if args.compile else s.model_flops())
    t = time_runs(s.step, device, args.warmup + 2 * args.compile, args.repeat)["median"]
    batch = len(s.dataset)
    return {"batch": batch, "ms": 1000 * t, "samples_s": batch / t, "flops": flops,
            "peak_mem_gb": peak_memory(s.step, device) / 2**30}


def breakdown(s: Setup, args, setting: str) -> dict:
    seconds = s.section_seconds(args)
    return {"setting": setting, "section_seconds": seconds,
            "section_shares": {k: v / sum(seconds.values()) for k, v in seconds.items()}, "operators": s.operators()}


def run(args, device, dtype):
    peak = matmul_flops(device, DTYPES[dtype])
    rows, breakdowns, flops = [], {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for preset in csv_list(args.presets):
            sizes = [(64, 64)] if preset == "tiny" else [tuple(map(int, x.split("x"))) for x in csv_list(args.sizes)]
            ckpts = ["off"] if preset == "tiny" else csv_list(args.checkpointing)
            for size, pixels, ckpt in itertools.product(sizes, csv_list(args.pixels), ckpts):
                row = {"preset": preset, "size": f"{size[0]}x{size[1]}", "pixels": pixels, "ckpt": ckpt}
                s = Setup(preset, size, pixels, ckpt == "on", args, device, dtype, folder)
                try:
                    row.update(measure(s, args, device, flops.get((preset, size, pixels))))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                if row.get("flops"):
                    flops[preset, size, pixels] = row["flops"]
                    flop_s = row["flops"] / row["ms"] * 1e3
                    row.update(gflop=row["flops"] / 1e9, tflops=flop_s / 1e12, of_matmul=flop_s / peak)
                rows.append(row)
                if "error" not in row and preset not in breakdowns and not args.no_breakdown:
                    breakdowns[preset] = breakdown(s, args, f"{preset} {row['size']} pixels={pixels}")
                s = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, breakdowns, peak


def print_breakdown(b: dict):
    print(f"\n{b['setting']}: share of time per section (data = one process decoding the batch; workers "
          "overlap it with compute)")
    print("  " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in b["section_shares"].items()))
    print("  operator self time by section and kind (share of the step without data loading):")
    for section, kinds in b["operators"]["shares"].items():
        print(f"    {section:11s} " + "  ".join(f"{k} {100 * v:5.1f}%" for k, v in kinds.items()))
    print(f"  outside the CNN, attention and matmuls: {100 * b['operators']['outside_cnn_attention_matmul']:.1f}%")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = setup(args)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    rows, breakdowns, peak = run(args, device, dtype)
    print(f"{dtype} on {device}, {torch.get_num_threads()} threads; large matmul {peak / 1e12:.3f} TFLOP/s")
    print_table(rows, ["preset", "size", "pixels", "ckpt", "batch", "ms", "samples_s", "gflop", "tflops",
                       "of_matmul", "peak_mem_gb", "error"], "\nwhole pre-training step (median; gflop: model FLOPs "
                "per step, which do not depend on the machine's load)")
    for b in breakdowns.values():
        print_breakdown(b)
    result = {"benchmark": "step", "machine": machine(device), "dtype": dtype, "matmul_tflops": peak / 1e12,
              "rows": rows, "breakdowns": breakdowns}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
