"""The losses of pre-training and of the downstream tasks, and the inputs they need.

    make_itm_pairs       eq. (8) data: half of the pairs get the caption of another image (label 0)
    mask_tokens          eq. (7) data: BERT's 15% / 80-10-10 masking, never special or padding tokens
    pretrain_losses      L = L_MLM (eq. 7) + L_ITM (eq. 8)
    vqa_loss             binary cross-entropy on VQA's soft scores (Sec. 4.2)
    hard_negative_loss   retrieval ranking with hard negative mining (Sec. 4.2)

Only torch is needed: copy this file out beside model.py and heads.py and it works with the plain
`PixelBertConfig` (tested). The losses take logits and labels, so they do not depend on the model.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

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
                vocab_size: int, mask_id: int, probability: Union[float, torch.Tensor] = 0.15,
                replace_probs: Tuple[float, float] = (0.8, 0.1), predict: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, min_one: bool = False):
    """Eq. (7) inputs: BERT's masking [choice].

    Each real token not in ``special_ids`` is chosen independently with ``probability`` (the paper's
    15%: a short caption often has none; a (B, T) tensor gives each position its own rate).
    ``min_one`` forces one chosen token into every caption that drew none, which raises the rate of
    short captions far above ``probability``. A chosen
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
    chosen = (torch.rand(input_ids.shape, generator=generator).to(device) < torch.as_tensor(probability).to(device)) \
        & candidate
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


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits on the soft scores (Sec. 4.2), summed over the answers
    and averaged over the questions. This equals the element mean times num_answers, the
    convention of UNITER / ViLT / LXMERT [choice]: the plain element mean would divide every
    gradient by ~3,000 and leave the loss looking flat."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / max(len(logits), 1)


RETRIEVAL_LOSSES = ("hard6", "all21", "all21_offsets")


def hard_negative_loss(pos: torch.Tensor, neg: torch.Tensor, num_hard: int, form: str = "hard6",
                       hard_idx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy ranking the positive first, with gradients only through the positive
    and the ``num_hard`` highest-scoring (= highest-loss) negatives. The paper's sentence ("back-
    propagate only through the 5 negatives with the highest loss") reads three ways (``form``):

    - "hard6": a softmax over the positive and the 5 hard negatives only (UNITER's hard-negative
      training): dL/ds+ = p+ - 1 with p over those 6;
    - "all21": a softmax over all 1 + N scores, the easy ones as constants (detached): dL/ds+ = p+ - 1
      with p over all 21, and the easy negatives get no gradient;
    - "all21_offsets": over all 1 + N, the easy ones as offsets from the positive, s+ + (s_e - s+)
      detached: the loss stays invariant to a common shift of all scores, but dL/ds+ = p+ + sum_easy
      p_e - 1, smaller than in "all21" (the easy negatives move with the positive).

    pos (B,), neg (B, N) scores. ``hard_idx`` (B, num_hard) gives the hard negatives when already
    chosen (training chooses them in a gradient-free pass). Returns (loss, hard_idx)."""
    if form not in RETRIEVAL_LOSSES:
        raise ValueError(f"retrieval loss {form!r}: choose from {RETRIEVAL_LOSSES}")
    if hard_idx is None:
        hard_idx = neg.detach().topk(num_hard, dim=1).indices
    hard = neg.gather(1, hard_idx)                                            # (B, k), with gradients
    if form == "hard6":
        others = hard
    elif form == "all21":
        others = neg.detach().scatter(1, hard_idx, hard)                      # (B, N), easy ones constant
    else:
        offsets = neg.detach() - pos.detach()[:, None]
        others = (pos[:, None] + offsets).scatter(1, hard_idx, hard)          # (B, N), easy ones move with s+
    logits = torch.cat([pos[:, None], others], dim=1)
    target = torch.zeros(len(pos), dtype=torch.long, device=pos.device)
    return F.cross_entropy(logits.float(), target), hard_idx
