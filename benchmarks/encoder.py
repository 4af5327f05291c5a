"""Our transformer (PixelBert's layers) against Hugging Face's BertModel, same weights, same inputs.

    python benchmarks/encoder.py                                    # CPU, fp32: 2 x 768, batch 4
    python benchmarks/encoder.py --device cuda --layers 12 --batch 64 --dtype bf16

A random BertModel is saved with save_pretrained and loaded into PixelBert with the repository's own
loader (pixel_bert.pretrained.load_bert_weights), so the comparison also checks the weight mapping:
with no image PixelBert is exactly BERT, and the outputs must agree (on a padded and an unpadded
batch) before anything is timed; the script aborts if they do not.

Timed, in turns (ours, HF-SDPA, HF-eager, ours, ...: load changes hit all alike): forward +
backward of the encoder in training mode (dropout on) at the joint sequence
lengths of pre-training (40 text tokens + 100 sampled pixels = 140 positions) and fine-tuning
(40 + all 273 pixels = 313), each with an unpadded batch (every caption 40 tokens: our mask-free
attention path) and a padded one (caption lengths 8..40). Reported per setting: ms per step, ours /
HF-SDPA time, FLOP/s (FlopCounterMode's count of matmuls and attention over the measured time) and
that as a share of a large square matmul's FLOP/s, timed in the same turns.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from common import (DTYPES, add_common_args, autocast, count_flops, csv_list, machine, print_table, setup,
                    square_matmul, time_interleaved, write_json)
from pixel_bert.config import model_config_from_bert
from pixel_bert.model import PixelBert
from pixel_bert.pretrained import load_bert_weights

IMPLS = ("ours", "hf-sdpa", "hf-eager")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default 2; BERT-base: 12)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size; heads = hidden / 64 (default 768)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4; the paper: 64 per GPU)")
    p.add_argument("--text-len", type=int, default=40, help="caption tokens incl. [CLS]/[SEP] (default 40)")
    p.add_argument("--pixels", default="100,273", help="visual tokens per shape: 100 sampled (pre-training), "
                   "273 = 13x21 all pixels at 800x1333 (fine-tuning) (default 100,273)")
    p.add_argument("--padding", default="none,text", help="'none': every caption full length; 'text': "
                   "lengths 8..text-len, padded (default both)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout of both models while timing (default 0.1)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"which to time (default {','.join(IMPLS)})")
    return add_common_args(p, repeat=3)


def build_models(args, device):
    """(ours, {"hf-sdpa": BertModel, "hf-eager": BertModel}) holding identical weights."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                           hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    reference = BertModel(hf_config, add_pooling_layer=False)
    hf = {}
    for impl in ("sdpa", "eager"):
        hf_config._attn_implementation = impl
        model = BertModel(hf_config, add_pooling_layer=False)
        model.load_state_dict(reference.state_dict())
        hf[f"hf-{impl}"] = model.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        cfg = model_config_from_bert(f"{tmp}/config.json", backbone="resnet18", backbone_stages=1,
                                     backbone_weights=None, bert_weights=None)
        ours = PixelBert(cfg)
        load_bert_weights(ours, tmp, verbose=False)
    return ours.to(device), hf


def make_batch(args, length: int, padded: bool, vocab: int, device):
    ids = torch.randint(1000, vocab, (args.batch, length), device=device)
    mask = torch.ones(args.batch, length, dtype=torch.bool, device=device)
    if padded:  # captions of 8..text_len tokens, then the (unpadded) visual positions
        caption = torch.randint(8, args.text_len + 1, (args.batch,), device=device)
        mask[:, :args.text_len] = torch.arange(args.text_len, device=device)[None] < caption[:, None]
    return ids, mask


def forward(name, model, ids, mask):
    if name == "ours":
        return model(ids, mask).hidden
    return model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def train_step(name, model, ids, mask, device, dtype):
    """Forward + backward of one model in training mode (dropout on), gradients dropped after."""
    model.train()

    def step():
        with autocast(device, dtype):
            loss = forward(name, model, ids, mask).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def check_outputs_agree(ours, hf, args, vocab, device, dtype):
    """Abort unless every implementation gives our hidden states (eval mode: no dropout)."""
    tol = 1e-4 if dtype == "fp32" else 6e-2
    for padded in (False, True):
        ids, mask = make_batch(args, args.text_len + 100, padded, vocab, device)
        with torch.no_grad(), autocast(device, dtype):
            outs = {n: forward(n, m.eval(), ids, mask).float() for n, m in [("ours", ours), *hf.items()]}
        for name, out in outs.items():
            err = (out - outs["ours"])[mask].abs().max().item()
            if not err <= tol:
                raise SystemExit(f"ABORT: {name} differs from ours by {err:.2e} (> {tol:.0e}) on a "
                                 f"{'padded' if padded else 'full'} batch: the weight mapping or a fast path is wrong")
    print(f"outputs agree (max |diff| <= {tol:.0e} on valid positions, padded and unpadded batches)")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = setup(args)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    ours, hf = build_models(args, device)
    models = {"ours": ours, **hf}
    vocab = ours.config.vocab_size
    check_outputs_agree(ours, hf, args, vocab, device, dtype)
    matmul, matmul_flop = square_matmul(device, DTYPES[dtype])
    rows, peaks = [], []
    for pixels in csv_list(args.pixels, int):
        length = args.text_len + pixels
        for padding in csv_list(args.padding):
            ids, mask = make_batch(args, length, padding == "text", vocab, device)
            steps = {name: train_step(name, models[name], ids, mask, device, dtype) for name in csv_list(args.impls)}
            flops = count_flops(next(iter(steps.values())))  # the same math in every implementation
            seconds = time_interleaved({**steps, "matmul": matmul}, device, args.warmup, args.repeat)
            peak = matmul_flop / seconds.pop("matmul")  # the reference, timed in the same turns
            peaks.append(peak)
            for name, t in seconds.items():
                rows.append({"positions": length, "padding": padding, "impl": name, "ms": 1000 * t,
                             "tflops": flops / t / 1e12, "of_matmul": flops / t / peak, "gflop": flops / 1e9})
    for r in rows:  # ours / HF-SDPA time, in the same setting
        base = [x for x in rows if x["impl"] == "hf-sdpa" and x["positions"] == r["positions"]
                and x["padding"] == r["padding"]]
        r["vs_hf_sdpa"] = r["ms"] / base[0]["ms"] if base else None
    print(f"{args.layers} layers x {args.hidden}, batch {args.batch}, {dtype} on {device}, "
          f"{torch.get_num_threads()} threads; large matmul: {min(peaks) / 1e12:.3g}..{max(peaks) / 1e12:.3g} TFLOP/s")
    print_table(rows, ["positions", "padding", "impl", "ms", "vs_hf_sdpa", "tflops", "of_matmul", "gflop"],
                "\nforward+backward per step (vs_hf_sdpa = time / HF SDPA time; of_matmul = FLOP/s / large matmul's)")
    result = {"benchmark": "encoder", "machine": machine(device), "dtype": dtype, "layers": args.layers,
              "hidden": args.hidden, "batch": args.batch, "matmul_tflops": [p / 1e12 for p in peaks], "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
