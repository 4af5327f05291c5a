"""The paper's two optimisers and its schedule (Sec. 4.1 of the paper, "Implementation Details";
docs/paper.md#optimisation): SGD for the CNN, AdamW for the transformer and heads, linear warm-up
and step decay, counted in optimizer steps."""
from __future__ import annotations

from typing import List, Optional

import torch

from .config import TrainConfig

CNN_PREFIX = "bert.visual_embedding.backbone."      # the ResNet trunk


VISUAL_PREFIXES = ("bert.visual_embedding.proj.", "bert.visual_embedding.semantic")  # eq. (5)'s conv and s_v


def is_cnn_parameter(name: str, cfg: Optional[TrainConfig] = None) -> bool:
    """Whether a parameter (named as in a task model) trains with the CNN's SGD: the ResNet trunk,
    plus the 1x1 projection and s_v of eq. (5) when ``cfg.visual_embedding_optimizer == "sgd"``."""
    name = name if name.startswith("bert.") else f"bert.{name}"
    if name.startswith(CNN_PREFIX):
        return True
    return cfg is not None and cfg.visual_embedding_optimizer == "sgd" and name.startswith(VISUAL_PREFIXES)


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> List[torch.optim.Optimizer]:
    """SGD for the CNN, AdamW for the transformer and heads [paper]. With ``cfg.no_decay_1d`` every
    1-D parameter (biases, LayerNorm weights, s_v) gets no AdamW weight decay (BERT practice)
    [choice]; SGD decays every CNN parameter. Frozen parameters get no optimiser."""
    cnn, decay, no_decay = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if is_cnn_parameter(name, cfg):
            cnn.append(p)
        elif cfg.no_decay_1d and p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    optimizers = [make_optimizer(torch.optim.AdamW, [{"params": decay, "weight_decay": cfg.weight_decay},
                                                     {"params": no_decay, "weight_decay": 0.0}],
                                 cfg.fused_optimizers, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)]
    if cnn:
        optimizers.append(make_optimizer(torch.optim.SGD, cnn, cfg.fused_optimizers, lr=cfg.cnn_lr,
                                         momentum=cfg.cnn_momentum, weight_decay=cfg.cnn_weight_decay))
    return optimizers


def make_optimizer(cls, params, fused: bool, **settings) -> torch.optim.Optimizer:
    """``cls(params, **settings)`` with ``fused=True`` when asked for and this torch has a fused kernel
    for the parameters' device; otherwise the plain implementation (same update to rounding)."""
    if fused:
        params = list(params)  # read twice when the fused constructor refuses
        try:
            return cls(params, fused=True, **settings)
        except (TypeError, RuntimeError):  # older torch: no `fused` argument, or no kernel for this device
            pass
    return cls(params, **settings)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up from
    ``warmup_start_factor`` over ``warmup_steps``, then x``decay_factor`` at each decay epoch, and
    x``itm_lr_factor`` once ITM has joined (``itm_start_step``; pre-training's delayed ITM).
    Counted in optimizer steps, so gradient accumulation never shrinks the schedule."""
    warm = 1.0
    if step < cfg.warmup_steps:
        warm = cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / cfg.warmup_steps
    epoch = step / max(steps_per_epoch, 1)
    itm = cfg.itm_lr_factor if step >= cfg.itm_start_step else 1.0
    return warm * cfg.decay_factor ** sum(epoch >= e for e in cfg.decay_epochs) * itm
