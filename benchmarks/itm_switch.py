"""What the ITM classifier of eq. (8) can read when ITM joins: probes of "does this caption fit this
image?" on held-out pairs (half mismatched, captions unmasked), fitted on one half of the pairs and
scored on the other. Prints figures; asserts nothing (benchmarks are not tests).

    python train.py --seed 4 --max-steps 400 --output-dir runs/switch-s4     # the demo up to its switch
    python benchmarks/itm_switch.py --model runs/switch-s4/model.pt

Each probe reads one summary of the last layer: the [CLS] state (what eq. (8) reads), the mean of the
word tokens' states, and the colour word's state; "linear" is a logistic regression, "mlp" adds one
hidden layer of 256. A probe well above 0.5 on the words but near it on [CLS] means that the words
already tell a mismatch and [CLS] does not carry it yet (docs/demo.md). Also: the image's colour read
from a mismatched caption's colour word (it can only come from the pixels) and from [CLS].
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pixel_bert import synthetic  # noqa: E402  (the repository root is on the path first)
from pixel_bert.batches import CaptionCollator  # noqa: E402
from pixel_bert.files import write_json  # noqa: E402
from pixel_bert.images import ImageTransform  # noqa: E402
from pixel_bert.losses import make_itm_pairs  # noqa: E402
from pixel_bert.saved_model import load_saved_model  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a pre-training model.pt (e.g. a run stopped at its ITM switch)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="the world it trained on (default 0); the pairs "
                   "come from its held-out images (seed + 1), as train.py's own check")
    p.add_argument("--pairs", type=int, default=2048, help="held-out pairs, half to fit each probe and half to "
                   "score it (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairing and of the probes (default 0)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


@torch.no_grad()
def last_layer_summaries(model, tokenizer, config, world: int, pairs: int, seed: int) -> Dict[str, torch.Tensor]:
    """Per pair: the [CLS] state, the mean word state, the colour word's state, the label and the
    image's own colour (index into synthetic.colour_words(), -1 when its caption names none)."""
    data = synthetic.SyntheticCaptions(pairs, world + 1, config.image_short_side,
                                       transform=ImageTransform.from_config(config), max_shapes=1)
    loader = torch.utils.data.DataLoader(data, batch_size=64,
                                         collate_fn=CaptionCollator(tokenizer, config.max_text_len, config.feature_stride))
    colour_ids = torch.tensor([tokenizer.token_to_id(w) for w in synthetic.colour_words()])
    special = torch.tensor([tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]")])
    g = torch.Generator().manual_seed(seed)
    parts = {k: [] for k in ("cls", "mean_words", "colour_word", "label", "has_colour", "image_colour")}
    for batch in loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        visual = model.bert.encode_image(batch["images"], batch["pixel_mask"])
        pair_ids, pair_mask, labels = make_itm_pairs(ids, mask, batch["image_keys"], 0.5, generator=g)
        out, _, _ = model(pair_ids, pair_mask, visual=visual)
        text = out.hidden[:, :out.text_len]                                       # (B, T, H)
        words = (pair_mask.bool() & ~torch.isin(pair_ids, special)).float()[..., None]
        colour = (torch.isin(pair_ids, colour_ids) & pair_mask.bool()).float()[..., None]
        parts["cls"].append(out.cls)
        parts["mean_words"].append((text * words).sum(1) / words.sum(1).clamp_min(1))
        parts["colour_word"].append((text * colour).sum(1) / colour.sum(1).clamp_min(1))
        parts["label"].append(labels)
        parts["has_colour"].append(colour.squeeze(-1).bool().any(1))
        own = (ids[..., None] == colour_ids).any(1)                                 # (B, colours)
        parts["image_colour"].append(torch.where(own.any(1), own.float().argmax(1), torch.tensor(-1)))
    return {k: torch.cat(v) for k, v in parts.items()}


def probe_accuracy(x: torch.Tensor, target: torch.Tensor, classes: int, hidden: int = 0, seed: int = 0,
                   steps: int = 400) -> float:
    """Fit a probe (logistic regression, or one hidden layer when ``hidden``) on the first half of
    the rows, return its accuracy on the second half. Features standardised on the fitting half."""
    torch.manual_seed(seed)
    half = len(x) // 2
    x = (x - x[:half].mean(0)) / (x[:half].std(0) + 1e-6)
    out_dim = 1 if classes == 2 else classes
    net = (nn.Linear(x.shape[1], out_dim) if not hidden else
           nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, out_dim)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)

    def loss_and_prediction(rows):
        logits = net(x[rows])
        if classes == 2:
            return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target[rows].float()), logits.squeeze(-1) > 0
        return F.cross_entropy(logits, target[rows]), logits.argmax(-1)
    for _ in range(steps):
        opt.zero_grad()
        loss_and_prediction(slice(0, half))[0].backward()
        opt.step()
    with torch.no_grad():
        _, prediction = loss_and_prediction(slice(half, None))
    return (prediction.long() == target[half:].long()).float().mean().item()


def main(argv: Optional[list] = None) -> Dict[str, float]:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    saved = load_saved_model(args.model)
    model = saved.model.eval()
    s = last_layer_summaries(model, saved.tokenizer(), saved.config, args.synthetic_seed, args.pairs, args.seed)
    label = s["label"].long()
    result: Dict[str, float] = {}
    for name in ("cls", "mean_words", "colour_word"):
        result[f"match_{name}_linear"] = probe_accuracy(s[name], label, 2, seed=args.seed)
        result[f"match_{name}_mlp"] = probe_accuracy(s[name], label, 2, hidden=256, seed=args.seed)
    mismatched = (label == 0) & s["has_colour"] & (s["image_colour"] >= 0)
    result["image_colour_from_mismatched_colour_word"] = probe_accuracy(
        s["colour_word"][mismatched], s["image_colour"][mismatched], len(synthetic.colour_words()), seed=args.seed)
    named = s["image_colour"] >= 0
    result["image_colour_from_cls"] = probe_accuracy(s["cls"][named], s["image_colour"][named],
                                                     len(synthetic.colour_words()), seed=args.seed)
    print(f"{args.model}: {len(label)} held-out pairs (half mismatched), probes fitted on half, scored on the rest")
    print(f"{'matched vs mismatched, read from':<34} {'linear':>7} {'mlp':>7}")
    for name, what in (("cls", "[CLS] (what eq. (8) reads)"), ("mean_words", "mean of the word tokens"),
                       ("colour_word", "the colour word")):
        print(f"{what:<34} {result[f'match_{name}_linear']:7.3f} {result[f'match_{name}_mlp']:7.3f}")
    print(f"image colour from a mismatched caption's colour word (linear): "
          f"{result['image_colour_from_mismatched_colour_word']:.3f}")
    print(f"image colour from [CLS] (linear): {result['image_colour_from_cls']:.3f}")
    if args.json:
        write_json(args.json, {"model": args.model, "pairs": len(label), **result})
    return result


if __name__ == "__main__":
    main()
