"""Configuration dataclasses and presets.

Every detail that PAPER.md marks [choice] is a field here, with PAPER.md's default and a comment
saying so; [paper] facts are defaults too, so a preset reads as the paper's recipe.

- `ModelConfig`: the network (section 1): backbone, visual embedding, BERT sizes.
- `TrainConfig`: optimisation and schedule (section 2 "Optimisation"), shared by pre-training and
  fine-tuning; task presets override the epochs, decay points and batch sizes (section 3).

Presets are plain dicts of overrides (no registry): `MODEL_PRESETS` and `TRAIN_PRESETS`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    # ---- visual embedding, eq. (1) --------------------------------------------------------------
    backbone: str = "resnet50"            # resnet18/34/50/101/152 or resnext152_32x8d [paper: R50, X152]
    backbone_weights: Optional[str] = "imagenet"  # "imagenet" (torchvision enum), a state-dict file, or None
    backbone_stages: int = 4              # ResNet stages kept (4 = full trunk, stride 32); tiny uses fewer
    freeze_backbone_bn: bool = True       # BatchNorm statistics frozen: padded, variable-size batches of
                                          # 64/GPU would corrupt batch statistics (detection practice) [choice]
    visual_proj_kernel: int = 1           # conv from backbone channels to hidden size: 1x1 [choice]
    visual_pool: int = 2                  # 2x2 max-pool after the conv -> stride 64 [paper]
    num_sampled_pixels: int = 100         # random pixel sampling in pre-training [paper]
    channels_last: bool = True            # CNN activations and weights in NHWC layout: the fast layout of
                                          # cuDNN's tensor-core convolutions; same results up to rounding
    backbone_checkpointing: bool = False  # recompute the CNN's stem and residual blocks in backward to save
                                          # memory (x152 at 600x1000, r50 at 64/GPU on a 32 GB card); needs
                                          # freeze_backbone_bn
    image_short_side: int = 800           # keep-ratio resize [paper: 800/1333 for R50]
    image_long_side: int = 1333           # cap on the longer side after the resize [paper: 1333 for R50]
    image_mean: Tuple[float, float, float] = IMAGENET_MEAN  # of the torchvision weights [choice]
    image_std: Tuple[float, float, float] = IMAGENET_STD  # per-channel std of the normalisation [choice]
    image_jpeg_draft: bool = True         # decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when
                                          # that still covers the resize target and gives the same output
                                          # size: far less decoding work for large photos [choice]
    # ---- language embedding, eq. (2), and cross-modality transformer, eq. (3) --------------------
    vocab_size: int = 30522               # bert-base-uncased WordPiece vocabulary [choice]
    hidden_size: int = 768                # BERT-base sizes [paper: 12 layers; the rest BERT's, choice]
    num_layers: int = 12                  # transformer layers [paper]
    num_heads: int = 12                   # attention heads
    intermediate_size: int = 3072         # FFN width
    hidden_act: str = "gelu"              # FFN activation: gelu (BERT), gelu_new or relu
    hidden_dropout: float = 0.1           # dropout on embeddings and block outputs (BERT)
    attention_dropout: float = 0.1        # dropout on attention probabilities (BERT)
    max_position_embeddings: int = 512    # text positions the embedding table holds (BERT)
    type_vocab_size: int = 2              # token-type table (only type 0 is used: s_w of eq. 2)
    layer_norm_eps: float = 1e-12         # BERT's LayerNorm epsilon
    initializer_range: float = 0.02       # BERT init: normal(0, 0.02), zero bias, LayerNorm 1/0 [choice]
    pad_token_id: int = 0                 # id of [PAD] in the vocabulary
    max_text_len: int = 40                # tokens incl. [CLS]/[SEP]; longer captions are truncated [choice]
    attention_impl: str = "sdpa"          # "sdpa" (F.scaled_dot_product_attention) or "manual"
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward to save memory
    # ---- heads -----------------------------------------------------------------------------------
    tie_mlm_decoder: bool = True          # MLM output layer tied to the word embeddings [choice]
    num_answers: int = 3129               # VQA answer vocabulary size [choice: community standard]
    vocab_file: Optional[str] = None      # WordPiece vocab.txt; None = bert-base-uncased's (downloaded)
    bert_weights: Optional[str] = None    # HF BERT directory/file to initialise from ("bert-base-uncased")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def feature_stride(self) -> int:
        """Input pixels per feature pixel: the backbone's stride times the pool."""
        return 2 ** (self.backbone_stages + 1) * self.visual_pool

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 1 <= self.backbone_stages <= 4:
            raise ValueError(f"backbone_stages must be 1..4, got {self.backbone_stages}")
        if self.attention_impl not in ("sdpa", "manual"):
            raise ValueError(f"attention_impl must be 'sdpa' or 'manual', got {self.attention_impl!r}")
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)


@dataclass
class TrainConfig:
    # ---- optimisers [paper], with SOHO's unstated details [choice] --------------------------------
    cnn_lr: float = 1e-2                  # SGD for the CNN [paper]
    cnn_weight_decay: float = 5e-4        # SGD weight decay [paper]
    cnn_momentum: float = 0.9             # [choice, from SOHO]
    lr: float = 1e-4                      # AdamW for the transformer and heads [paper]
    weight_decay: float = 1e-2            # AdamW weight decay (none on biases and LayerNorm) [paper]
    adam_betas: Tuple[float, float] = (0.9, 0.999)  # [choice, from SOHO]
    adam_eps: float = 1e-6                # [choice, from SOHO]
    warmup_steps: int = 1000              # linear warm-up in optimizer steps [choice, from SOHO]
    warmup_start_factor: float = 1.0 / 3  # warm-up starts at lr/3 [choice, from SOHO]
    grad_clip: float = 10.0               # max global grad norm [choice, from SOHO]
    epochs: int = 40                      # [paper]
    decay_epochs: Tuple[int, ...] = (25, 35)  # lr x decay_factor at these epochs [paper]
    decay_factor: float = 0.1             # lr multiplier at each decay epoch [paper]
    freeze_backbone: bool = False         # retrieval fine-tuning freezes the CNN [paper]
    # ---- batch and precision ---------------------------------------------------------------------
    batch_size: int = 64                  # per process [paper: 64 per GPU x 64 GPUs = 4096]
    grad_accum_steps: int = 1             # micro-batches per optimizer step
    amp: str = "auto"                     # "auto": bf16 where supported, else fp16 + loss scaling on
                                          # CUDA, fp32 on CPU; or "bf16" / "fp16" / "none" [choice]
    max_nonfinite_steps: int = 10         # consecutive non-finite losses tolerated before stopping
    # ---- pre-training tasks ----------------------------------------------------------------------
    mlm_probability: float = 0.15         # [paper]
    mlm_replace_probs: Tuple[float, float] = (0.8, 0.1)  # [MASK] / random; rest unchanged [choice: BERT]
    itm_negative_ratio: float = 0.5       # half the pairs get another image's caption [paper]
    mlm_probability_before_itm: Optional[float] = None  # masking rate while MLM runs alone (None = mlm_probability)
    itm_start_step: int = 0               # optimizer steps of MLM alone before ITM joins (0 = together from
                                          # the start, as the paper); the CPU demo's from-scratch CNN first
                                          # learns to see from MLM, since ITM at chance only adds noise
    sample_pixels: bool = True            # random pixel sampling in pre-training [paper]
    # ---- data, logging, checkpoints --------------------------------------------------------------
    num_workers: int = 4                  # DataLoader worker processes per training process
    group_by_aspect_ratio: bool = True    # batches of similar aspect ratio to cut padding
    fatal_bad_samples: bool = False       # a bad sample is skipped and counted, unless this is set
    log_every: int = 20                   # optimizer steps between progress lines
    ckpt_every: int = 1000                # optimizer steps between checkpoints (plus each epoch end)
    keep_checkpoints: int = 3             # newest checkpoints kept in the run folder
    seed: int = 0                         # seeds model init, data order and masking

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self.decay_epochs = tuple(self.decay_epochs)
        self.mlm_replace_probs = tuple(self.mlm_replace_probs)
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp must be auto/bf16/fp16/none, got {self.amp!r}")
        if self.grad_accum_steps < 1:
            raise ValueError("grad_accum_steps must be >= 1")


# ---- presets: overrides of the defaults above ------------------------------------------------------

MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's ablation model: ResNet-50, BERT-base, 800/1333, 100 sampled pixels.
    "r50": dict(backbone="resnet50", bert_weights="bert-base-uncased"),
    # The paper's best model: ResNeXt-152 32x8d, 600/1000.
    "x152": dict(backbone="resnext152_32x8d", image_short_side=600, image_long_side=1000,
                 bert_weights="bert-base-uncased"),
    # Tests and the CPU demo: a ResNet-18 trunk to stage 2 (stride 8, then pool -> 16) on 64x64
    # images gives a 4x4 grid; a 4-layer, 128-wide transformer over the synthetic vocabulary. The CNN
    # starts from scratch (no download), so its BatchNorm learns its statistics.
    "tiny": dict(backbone="resnet18", backbone_weights=None, backbone_stages=2, freeze_backbone_bn=False,
                 num_sampled_pixels=12, image_short_side=64, image_long_side=64,
                 vocab_size=64, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                 max_position_embeddings=64, max_text_len=24, num_answers=32),
}

TRAIN_PRESETS: Dict[str, Dict[str, Any]] = {
    "pretrain": dict(),
    "vqa": dict(epochs=18, decay_epochs=(12, 16), batch_size=16, sample_pixels=False),  # 256 over 16 GPUs
    "nlvr2": dict(epochs=18, decay_epochs=(12, 16), batch_size=8, sample_pixels=False),  # 128 over 16 GPUs
    "retrieval-f30k": dict(epochs=10, decay_epochs=(6,), batch_size=64, freeze_backbone=True,
                           sample_pixels=False),
    "retrieval-coco": dict(epochs=4, decay_epochs=(2,), batch_size=64, freeze_backbone=True,
                           sample_pixels=False),
}


def make_model_config(preset: str = "r50", **overrides) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[preset], **overrides})


def make_train_config(preset: str = "pretrain", **overrides) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown train preset {preset!r}; choose from {sorted(TRAIN_PRESETS)}")
    return TrainConfig(**{**TRAIN_PRESETS[preset], **overrides})


def config_to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, d: Dict[str, Any]):
    """Build `cls` from a dict, refusing unknown keys (a typo must not silently fall back)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(names)}")
    return cls(**d)


def model_config_from_bert(config_json: str, **overrides) -> ModelConfig:
    """A ModelConfig whose transformer matches a Hugging Face BERT config.json (any BERT size)."""
    with open(config_json, encoding="utf-8") as f:
        hf = json.load(f)
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"{config_json}: model_type {hf.get('model_type')!r} is not 'bert'")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{config_json}: only absolute position embeddings are supported")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "relu"):
        raise ValueError(f"{config_json}: hidden_act {act!r} is not supported (gelu, gelu_new, relu)")
    mapped = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"], hidden_act=act,
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id", 0))
    return ModelConfig(**{**mapped, **overrides})


def parse_override(cfg, key: str, value: str):
    """Set ``cfg.key`` from a command-line string, converting to the field's type (used by scripts)."""
    names = {f.name: f for f in fields(cfg)}
    if key not in names:
        raise ValueError(f"unknown config field {key!r} for {type(cfg).__name__}; known: {sorted(names)}")
    current = getattr(cfg, key)
    if value.lower() in ("none", "null") and (current is None or names[key].default is None):
        parsed = None
    elif isinstance(current, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key} expects true/false, got {value!r}")
        parsed = value.lower() in ("true", "1", "yes")
    elif isinstance(current, int) and not isinstance(current, bool):
        parsed = int(value)
    elif isinstance(current, float):
        parsed = float(value)
    elif isinstance(current, tuple):
        items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        kind = type(current[0]) if current else float
        parsed = tuple(kind(v) for v in items)
    elif current is None:  # an Optional field that is None now: convert by its annotation
        kind = str(names[key].type)
        parsed = float(value) if "float" in kind else int(value) if "int" in kind else value
    else:
        parsed = value
    setattr(cfg, key, parsed)
    cfg.__post_init__()
    return cfg


def field_help(cls) -> Dict[str, str]:
    """Each field's comment in this file (the text after ``#`` on its line and the comment lines
    under it), so command-line ``--help`` explains every flag from the one place it is written."""
    import inspect
    import re
    docs: Dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        if m and m.group(1) in {f.name for f in fields(cls)}:
            last = m.group(1)
            docs[last] = (m.group(2) or "").strip()
            continue
        c = re.match(r"\s+#\s*(.*)$", line)
        if c and last and not c.group(1).startswith("----"):
            docs[last] = (docs[last] + " " + c.group(1).strip()).strip()
        else:
            last = None
    return docs


def add_config_arguments(parser, cls, prefix_help: str = ""):
    """One ``--field`` flag per dataclass field, default None (= keep the preset's value)."""
    docs = field_help(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields{prefix_help}")
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(f"--{f.name}", default=None, metavar="V",
                           help=f"{docs.get(f.name, '')} (default {default!r})")


def apply_overrides(cfg, args) -> list:
    """Apply the ``--field`` flags the user gave to ``cfg``; returns the names changed."""
    changed = []
    for f in fields(cfg):
        value = getattr(args, f.name, None)
        if value is not None:
            parse_override(cfg, f.name, value)
            changed.append(f.name)
    return changed
