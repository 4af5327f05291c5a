"""Pre-training tasks (Sec. 3.3 of the paper): masked language modelling, eq. (7), and image-text
matching, eq. (8), computed from one forward pass with random pixel sampling.

    make_itm_pairs   half of the pairs get the caption of a different image (label 0)
    mask_tokens      BERT's 15% / 80-10-10 masking, never special or padding tokens
    pretrain_step    the batch -> (loss, metrics) used by train.py
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .distributed import unwrap

IGNORE_INDEX = -100  # label of tokens that are not predicted (cross_entropy's ignore_index)


def make_itm_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_keys: Sequence[str],
                   negative_ratio: float = 0.5, generator: Optional[torch.Generator] = None):
    """Eq. (8) data: choose ``negative_ratio`` of the pairs and give each the caption of another
    image in the batch (never a caption of the same image, as judged by ``image_keys``).

    Returns (input_ids, attention_mask, itm_labels) with labels 1.0 for matched pairs and 0.0 for
    mismatched ones. A pair for which the batch holds no other image stays a positive.
    """
    B = input_ids.shape[0]
    keys = {k: i for i, k in enumerate(dict.fromkeys(image_keys))}
    codes = torch.tensor([keys[k] for k in image_keys])
    other_image = codes[:, None] != codes[None, :]                           # (B, B) allowed donors
    want_negative = torch.rand(B, generator=generator) < negative_ratio
    # a uniformly random allowed donor per row: random scores, disallowed ones pushed below zero
    scores = torch.rand(B, B, generator=generator).masked_fill(~other_image, -1.0)
    donor = scores.argmax(dim=1)                                             # (B,)
    negative = want_negative & other_image.any(dim=1)
    source = torch.where(negative, donor, torch.arange(B))
    labels = (~negative).float()
    source = source.to(input_ids.device)
    return input_ids[source], attention_mask[source], labels.to(input_ids.device)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int],
                vocab_size: int, mask_id: int, probability: float = 0.15,
                replace_probs: Tuple[float, float] = (0.8, 0.1), predict: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, min_one: bool = False):
    """Eq. (7) inputs: BERT's masking [choice].

    Each real token not in ``special_ids`` is chosen independently with ``probability`` (the paper's
    15%: a short caption often has none). ``min_one`` forces one chosen token into every caption
    that drew none, which raises the rate of short captions far above ``probability``. A chosen
    token becomes [MASK] (80%), a random non-special token (10%) or stays (10%). ``predict`` (B,)
    bool limits the labels to some captions (matched pairs only); the masking itself is applied to
    every caption, so it carries no hint of which pairs match.
    Returns (masked_ids, labels) with labels = IGNORE_INDEX where nothing is predicted.
    """
    device = input_ids.device
    special = torch.zeros(vocab_size, dtype=torch.bool)
    special[list(special_ids)] = True
    special = special.to(device)
    candidate = attention_mask.bool() & ~special[input_ids]                  # (B, T)
    chosen = (torch.rand(input_ids.shape, generator=generator).to(device) < probability) & candidate
    if min_one:  # where a caption drew none, take one random candidate
        fallback = torch.rand(input_ids.shape, generator=generator).to(device).masked_fill(~candidate, -1.0)
        fallback = F.one_hot(fallback.argmax(dim=1), input_ids.shape[1]).bool() & candidate
        chosen = chosen | (fallback & ~chosen.any(dim=1, keepdim=True))
    # Labels only where asked (matched pairs), but every caption is masked alike: masking only the
    # matched ones would tell the ITM head the answer (a caption with [MASK] = a matched pair).
    labelled = chosen if predict is None else chosen & predict.to(device)[:, None]
    labels = torch.where(labelled, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    r = torch.rand(input_ids.shape, generator=generator).to(device)
    to_mask = chosen & (r < replace_probs[0])
    to_random = chosen & (r >= replace_probs[0]) & (r < replace_probs[0] + replace_probs[1])
    allowed = (~special).nonzero().squeeze(1)                                # non-special ids
    random_ids = allowed[torch.randint(len(allowed), input_ids.shape, generator=generator).to(device)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def pretrain_losses(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, itm_logits: torch.Tensor,
                    itm_labels: torch.Tensor, itm_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """L = L_MLM (eq. 7, mean over predicted tokens) + itm_weight * L_ITM (eq. 8, binary cross-entropy);
    the paper adds the two (itm_weight 1)."""
    predicted = mlm_labels != IGNORE_INDEX
    if predicted.any():
        mlm_loss = F.cross_entropy(mlm_logits[predicted].float(), mlm_labels[predicted])
        mlm_acc = (mlm_logits[predicted].argmax(-1) == mlm_labels[predicted]).float().mean()
    else:  # keep the graph connected so every parameter still gets a (zero) gradient
        mlm_loss = mlm_logits.sum() * 0.0
        mlm_acc = torch.zeros((), device=mlm_logits.device)
    itm_loss = F.binary_cross_entropy_with_logits(itm_logits.float(), itm_labels)
    itm_acc = ((itm_logits > 0).float() == itm_labels).float().mean()
    return dict(loss=mlm_loss + itm_weight * itm_loss, mlm_loss=mlm_loss.detach(), itm_loss=itm_loss.detach(),
                mlm_acc=mlm_acc.detach(), itm_acc=itm_acc.detach())


def prepare_pretrain_batch(batch: dict, tokenizer, train_cfg: TrainConfig, vocab_size: int, itm: bool = True):
    """Caption batch (pixel_bert.batches.CaptionCollator) -> model inputs with ITM pairs and MLM labels,
    plus the effective masking rate (predicted tokens / maskable tokens of the labelled captions).
    ``itm=False``: no mismatched pairs (MLM alone, see TrainConfig.itm_start_step)."""
    ids, mask, itm_labels = make_itm_pairs(batch["input_ids"], batch["attention_mask"], batch["image_keys"],
                                           train_cfg.itm_negative_ratio if itm else 0.0)
    probability = train_cfg.mlm_probability
    if not itm and train_cfg.mlm_probability_before_itm is not None:
        probability = train_cfg.mlm_probability_before_itm
    never = [tokenizer.token_to_id(t) for t in train_cfg.mlm_never_mask]
    predict = itm_labels.bool() if train_cfg.mlm_on_matched_only else torch.ones_like(itm_labels, dtype=torch.bool)
    masked_ids, mlm_labels = mask_tokens(ids, mask, never, vocab_size, tokenizer.mask_id, probability,
                                         train_cfg.mlm_replace_probs, predict=predict,
                                         min_one=train_cfg.mlm_min_one_mask)
    maskable = (mask.bool() & ~torch.isin(ids, torch.tensor(never)))[predict].sum()
    mask_rate = (mlm_labels != IGNORE_INDEX).sum() / maskable.clamp_min(1)
    return masked_ids, mask, mlm_labels, itm_labels, mask_rate


def pretrain_step(model, batch: dict, tokenizer, train_cfg: TrainConfig, device, step: int = 0) -> Dict[str, torch.Tensor]:
    """One micro-batch of pre-training: ITM pairs, MLM masking, one forward pass, both losses.
    ``step`` (optimizer steps so far) switches ITM on at ``train_cfg.itm_start_step``; before that
    the returned dict has no ``itm_loss`` / ``itm_acc`` (they would mean nothing)."""
    bert_config = unwrap(model).config
    itm = step >= train_cfg.itm_start_step
    ids, mask, mlm_labels, itm_labels, mask_rate = prepare_pretrain_batch(batch, tokenizer, train_cfg,
                                                                          bert_config.vocab_size, itm)
    sample = bert_config.num_sampled_pixels if train_cfg.sample_pixels else 0
    _, mlm_logits, itm_logits = model(ids.to(device), mask.to(device), batch["images"].to(device, non_blocking=True),
                                      batch["pixel_mask"].to(device, non_blocking=True), sample_pixels=sample)
    # before itm_start_step all pairs are matched: the ITM head stays in the graph (DDP needs every
    # parameter used) with weight 0, and its loss and accuracy are not reported
    out = pretrain_losses(mlm_logits, mlm_labels.to(device), itm_logits, itm_labels.to(device),
                          itm_weight=train_cfg.itm_weight if itm else 0.0)
    if not itm:
        del out["itm_loss"], out["itm_acc"]
    return {**out, "mask_rate": mask_rate}


@torch.no_grad()
def evaluate_pretraining(model, loader, tokenizer, probe_groups: Sequence[Sequence[int]], device,
                         seed: int = 1234) -> Dict[str, float]:
    """Held-out evidence that the model looks at the pixels.

    - ITM accuracy on pairs of which half are mismatched (eq. 8);
    - MLM accuracy on probe words (e.g. colour words, then shape words: one group masked at a time,
      so "the [MASK] shape is a triangle" can still be read off the triangle), predicted with the
      caption's own image and with another image of the batch. Learning from pixels shows as the
      first well above the second.
    Returns counts summed over every batch (the caller sums them over ranks when distributed).
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    size = max(tokenizer.vocab_size, 1 + max(max(group) for group in probe_groups))
    groups = []
    for group in probe_groups:
        member = torch.zeros(size, dtype=torch.bool)
        member[list(group)] = True
        groups.append(member)
    totals = dict(itm_correct=0.0, itm_total=0.0, mlm_true=0.0, mlm_shuffled=0.0, mlm_total=0.0)
    for batch in loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if len(ids) < 2:
            continue
        images, pixel_mask = batch["images"].to(device), batch["pixel_mask"].to(device)
        visual = model.bert.encode_image(images, pixel_mask)  # the CNN once per batch
        shift = torch.roll(torch.arange(len(ids)), 1)  # each caption meets its neighbour's image
        visuals = {"mlm_true": visual, "mlm_shuffled": visual[shift.to(device)]}
        pair_ids, pair_mask, itm_labels = make_itm_pairs(ids, mask, batch["image_keys"], 0.5, generator=g)
        _, _, itm_logits = model(pair_ids.to(device), pair_mask.to(device), visual=visual)
        totals["itm_correct"] += ((itm_logits.float().cpu() > 0).float() == itm_labels).sum().item()
        totals["itm_total"] += len(itm_labels)
        for member in groups:
            target = member[ids] & mask.bool()
            masked = torch.where(target, torch.full_like(ids, tokenizer.mask_id), ids).to(device)
            for key, vis in visuals.items():
                _, logits, _ = model(masked, mask.to(device), visual=vis)
                totals[key] += (logits.argmax(-1).cpu()[target] == ids[target]).sum().item()
            totals["mlm_total"] += target.sum().item()
    return totals


def summarise_pretraining_eval(totals: Dict[str, float]) -> Dict[str, float]:
    return dict(itm_acc=totals["itm_correct"] / max(totals["itm_total"], 1),
                mlm_acc_true_image=totals["mlm_true"] / max(totals["mlm_total"], 1),
                mlm_acc_shuffled_image=totals["mlm_shuffled"] / max(totals["mlm_total"], 1),
                pairs=totals["itm_total"], probe_words=totals["mlm_total"])
