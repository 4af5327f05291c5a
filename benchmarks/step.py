"""A whole pre-training step: CNN + transformer + MLM/ITM heads + both optimisers (PAPER.md section 2).

    python benchmarks/step.py                                       # CPU: tiny, and r50 at 600x1000, batch 1
    python benchmarks/step.py --device cuda --presets r50 --batch 64 --sizes 600x1000,800x1333 --dtype bf16

The step is the training loop's (pixel_bert.pretrain.pretrain_step under autocast, backward,
gradient clipping, SGD for the CNN + AdamW for the rest from engine.build_optimizers) on a batch
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
import tempfile
import time

import torch

from common import (DTYPES, add_common_args, autocast, count_flops, csv_list, machine, matmul_flops,
                    peak_memory, print_table, setup, sync, time_runs, write_json, write_photos)
from pixel_bert import synthetic
from pixel_bert.config import make_model_config, make_train_config
from pixel_bert.data import CaptionCollator, CaptionDataset, CaptionRecord, ImageTransform
from pixel_bert.engine import build_optimizers
from pixel_bert.heads import PixelBertForPreTraining
from pixel_bert.model import VisualTokens
from pixel_bert.pretrain import prepare_pretrain_batch, pretrain_losses, pretrain_step
from pixel_bert.tokenizer import WordPieceTokenizer


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
    p.add_argument("--fused-optimizers", action="store_true", help="engine.build_optimizers' AdamW and SGD with "
                   "fused=True (one kernel for all parameters), to compare with the default")
    p.add_argument("--no-breakdown", action="store_true", help="skip the section and operator breakdowns")
    return add_common_args(p, repeat=3)


class Setup:
    """A model, its optimisers and a collated batch (already on the device) for one setting."""

    def __init__(self, preset, size, pixels, checkpointing, args, device, dtype, folder):
        overrides = dict(backbone_weights=None, bert_weights=None, backbone_checkpointing=checkpointing)
        if preset != "tiny":
            overrides.update(image_short_side=size[0], image_long_side=size[1])
        if args.layers:
            overrides["num_layers"] = args.layers
        self.cfg = make_model_config(preset, **overrides)
        self.train_cfg = make_train_config("pretrain", sample_pixels=pixels == "sampled")
        self.model = PixelBertForPreTraining(self.cfg).to(device).train()
        self.optimizers = build_optimizers(self.model, self.train_cfg)
        if getattr(args, "fused_optimizers", False):  # the same groups and settings, fused kernels
            self.optimizers = [type(o)([{**g, "fused": True, "foreach": None} for g in o.param_groups])
                               for o in self.optimizers]
        self.forward_model = torch.compile(self.model) if args.compile else self.model
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
        self.device, self.dtype = device, dtype
        self.tokenizer = WordPieceTokenizer(synthetic.write_vocab(f"{folder}/vocab.txt"))
        batch = args.batch or (8 if preset == "tiny" else 1)
        paths = write_photos(f"{folder}/images", [(640, 480)] * batch)
        words = synthetic.SYNTHETIC_WORDS
        gen = torch.Generator().manual_seed(0)
        captions = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=gen))
                    for n in torch.randint(10, 39, (batch,), generator=gen)]  # 12..40 tokens
        records = [CaptionRecord(p, c, f"img{i}") for i, (p, c) in enumerate(zip(paths, captions))]
        self.dataset = CaptionDataset(records, ImageTransform.from_config(self.cfg))
        self.collate = CaptionCollator(self.tokenizer, self.cfg.max_text_len)
        self.host_batch = self.load_batch()
        self.batch = self.to_device()

    def load_batch(self):
        return self.collate([self.dataset[i] for i in range(len(self.dataset))])

    def to_device(self):
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in self.host_batch.items()}

    def step(self):
        """One optimizer step as engine.Trainer takes it."""
        with autocast(self.device, self.dtype):
            loss = pretrain_step(self.forward_model, self.batch, self.tokenizer, self.train_cfg, self.device)["loss"]
        self.scaler.scale(loss).backward()
        self.optimizer_step()

    def model_flops(self) -> int:
        """FLOPs of one step, counted without the CNN's recomputation (model FLOPs)."""
        backbone = self.model.bert.visual_embedding.backbone
        recompute, backbone.checkpointing = backbone.checkpointing, False
        try:
            return count_flops(self.step)
        finally:
            backbone.checkpointing = recompute

    def optimizer_step(self):
        for o in self.optimizers:
            self.scaler.unscale_(o)
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip)
        for o in self.optimizers:
            self.scaler.step(o)
            o.zero_grad(set_to_none=True)
        self.scaler.update()

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
                b, self.tokenizer, self.train_cfg, self.cfg.vocab_size)])
            v = timed("cnn", lambda: m.bert.encode_image(b["images"], b["pixel_mask"], sample))
            v_leaf = v.embeddings.detach().requires_grad_()
            out = timed("transformer", lambda: m.bert(ids, mask, visual=VisualTokens(v_leaf, v.mask, v.positions, v.grid)))
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
        """Self time of the operators of one sectioned step (torch.profiler) by section and kind
        (conv, matmul, attention, other), as shares of the step without data loading. On CPU every
        event's self CPU time (Python and autograd overhead are 'other'); on GPU the device time of the
        kernels each operator launched itself. An operator belongs to the section it started in."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile, record_function

        def marked(key, fn):
            with record_function(f"section:{key}"):
                out = fn()
                sync(self.device)
            return out
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            self.sectioned_step(marked)
        events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
        spans = [(e.time_range.start, e.time_range.end, e.name[len("section:"):]) for e in events
                 if e.name.startswith("section:")]
        table = {k: {kind: 0.0 for kind in ("conv", "matmul", "attention", "other")} for k in SECTIONS}
        for e in events:
            section = next((k for start, end, k in spans if start <= e.time_range.start <= end), None)
            if section is None:
                continue
            t = e.self_device_time_total if self.device.type == "cuda" else e.self_cpu_time_total
            table[section][operator_kind(e.name)] += t
        total = sum(t for k, kinds in table.items() if k != "data" for t in kinds.values()) or 1.0
        shares = {k: {kind: t / total for kind, t in kinds.items()} for k, kinds in table.items() if k != "data"}
        outside = sum(kinds["other"] for k, kinds in shares.items() if k != "cnn")
        return {"shares": shares, "outside_cnn_attention_matmul": outside}


SECTIONS = ("data", "h2d", "cnn", "transformer", "heads", "optimizer")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def operator_kind(name: str) -> str:
    if "convolution" in name:
        return "conv"
    if "attention" in name:  # aten::_scaled_dot_product_*_attention* and their backward
        return "attention"
    return "matmul" if name in MATMUL_OPS else "other"


def run(args, device, dtype):
    peak = matmul_flops(device, DTYPES[dtype])
    rows, breakdowns = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for preset in csv_list(args.presets):
            sizes = [(64, 64)] if preset == "tiny" else [tuple(map(int, s.split("x"))) for s in csv_list(args.sizes)]
            ckpts = ["off"] if preset == "tiny" else csv_list(args.checkpointing)
            flops = {}
            for size in sizes:
                for pixels in csv_list(args.pixels):
                    for ckpt in ckpts:
                        s = Setup(preset, size, pixels, ckpt == "on", args, device, dtype, folder)
                        try:
                            s.step()  # the optimizers allocate their state: outside the memory figure
                            if (size, pixels) not in flops and not args.compile:
                                flops[(size, pixels)] = s.model_flops()
                            t = time_runs(s.step, device, args.warmup + 2 * args.compile, args.repeat)["median"]
                            mem = peak_memory(s.step, device)
                        except torch.cuda.OutOfMemoryError:
                            rows.append({"preset": preset, "size": "x".join(map(str, size)), "pixels": pixels,
                                         "ckpt": ckpt, "error": "out of memory"})
                            del s
                            torch.cuda.empty_cache()
                            continue
                        f = flops.get((size, pixels))
                        rows.append({"preset": preset, "size": "x".join(map(str, size)), "pixels": pixels,
                                     "ckpt": ckpt, "batch": len(s.dataset), "ms": 1000 * t,
                                     "samples_s": len(s.dataset) / t, "tflops": f / t / 1e12 if f else None,
                                     "of_matmul": f / t / peak if f else None,
                                     "peak_mem_gb": mem / 2**30})
                        if preset not in breakdowns and not args.no_breakdown:
                            sections = s.section_seconds(args)
                            total = sum(sections.values())
                            breakdowns[preset] = {"setting": rows[-1], "section_seconds": sections,
                                                  "section_shares": {k: v / total for k, v in sections.items()},
                                                  "operators": s.operators()}
                        del s
    return rows, breakdowns, peak


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = setup(args)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    rows, breakdowns, peak = run(args, device, dtype)
    print(f"{dtype} on {device}, {torch.get_num_threads()} threads; large matmul {peak / 1e12:.3f} TFLOP/s")
    print_table(rows, ["preset", "size", "pixels", "ckpt", "batch", "ms", "samples_s", "tflops", "of_matmul",
                       "peak_mem_gb", "error"], "\nwhole pre-training step (median)")
    for preset, b in breakdowns.items():
        st = b["setting"]
        print(f"\n{preset} {st['size']} pixels={st['pixels']}: share of time per section "
              f"(data = one process decoding the batch; workers overlap it with compute)")
        print("  " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in b["section_shares"].items()))
        ops = b["operators"]
        print("  operator self time by section and kind (share of the step without data loading):")
        for section, kinds in ops["shares"].items():
            print(f"    {section:11s} " + "  ".join(f"{k} {100 * v:5.1f}%" for k, v in kinds.items()))
        print(f"  outside the CNN, attention and matmuls: {100 * ops['outside_cnn_attention_matmul']:.1f}%")
    result = {"benchmark": "step", "machine": machine(device), "dtype": dtype, "matmul_tflops": peak / 1e12,
              "rows": rows, "breakdowns": breakdowns}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
