"""Building a task model: new, with the initial weights its config asks for (`create_model`), or
from a checkpoint's state dict (`model_from_state`, the ``--init`` of train.py and finetune.py).

The task models are `pixel_bert.heads.TASK_MODELS`; pretrained initial weights come from
`pixel_bert.pretrained`. Saving and reading pixel-bert's own files is `pixel_bert.saved_model`.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import UserError
from .heads import TASK_MODELS
from .pretrained import load_backbone_weights, load_bert_weights, resolve_bert
from .tensor_files import LoadReport, assign_tensors


def create_model(config: ModelConfig, task: str = "pretrain", verbose: bool = True) -> nn.Module:
    """A task model with the initialisation its config asks for: ImageNet weights for the CNN
    (``backbone_weights``) and a BERT checkpoint for the transformer (``bert_weights``)."""
    if task not in TASK_MODELS:
        raise UserError(f"unknown task {task!r}; choose from {sorted(TASK_MODELS)}")
    model = TASK_MODELS[task](config)
    if config.backbone_weights not in (None, "", "none"):
        load_backbone_weights(model, config.backbone_weights, verbose)
    if config.bert_weights not in (None, "", "none"):
        load_bert_weights(model, resolve_bert(config.bert_weights), verbose)
    return model


def load_checkpoint_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
                            strict_bert: bool = True, verbose: bool = True) -> LoadReport:
    """Load a pixel-bert state dict into a task model. Tensors are matched by name; the shared
    ``bert.*`` part must be complete (``strict_bert``), heads absent from the checkpoint stay new
    (e.g. a VQA head on a pre-training checkpoint) and heads absent from the model are reported."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    report = LoadReport(source, assign_tensors(model, usable, source))
    report.missing = sorted(set(own) - set(usable))
    report.unused = sorted(set(state) - set(own))
    missing_bert = [k for k in report.missing if k.startswith("bert.")]
    if strict_bert and missing_bert:
        raise UserError(f"{source}: the checkpoint lacks {len(missing_bert)} tensors of the shared network, "
                         f"e.g. {missing_bert[:3]}; it does not match this model's configuration")
    if verbose:
        print(report.summary())
    return report


def model_from_state(task: str, config: ModelConfig, state: Dict[str, torch.Tensor], source: str,
                     log=print) -> nn.Module:
    """The ``task`` model (pixel_bert.heads.TASK_MODELS) started from a checkpoint's state dict
    (``--init`` of train.py and finetune.py): the shared bert.* part must load completely, heads of
    the same name load too, the others start new; the load report is logged."""
    model = TASK_MODELS[task](config)
    log(f"init: {load_checkpoint_weights(model, state, source, verbose=False).summary()}")
    return model
