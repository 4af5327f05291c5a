"""Configuration dataclasses and presets.

Every detail docs/paper.md marks [choice] is a field here, with the default given there and a comment
saying so; [paper] facts are defaults too, so a preset reads as the paper's recipe.

- `ModelConfig`: the network (Sec. 3.2): backbone, visual embedding, BERT sizes.
- `TrainConfig`: optimisation and schedule (Sec. 4.1 "Implementation Details"), shared by pre-training and
  fine-tuning; task presets override the epochs, decay points and batch sizes (Sec. 4.2).

Presets are plain dicts of overrides (no registry): `MODEL_PRESETS`, `TRAIN_PRESETS` and the recipes of
train.py's ``--config`` (`PRETRAIN_RECIPES`) here; each downstream task's recipe in its own module.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, Optional, Tuple

from .model import PixelBertConfig, check_fields, field_problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETECTRON_PIXEL_MEANS = (102.9801, 115.9465, 122.7717)  # Detectron's PIXEL_MEANS: BGR, 0-255
# The pixels Detectron's Caffe2 weights were trained on: BGR in 0-255 minus its means, no std
DETECTRON_INPUT = dict(image_format="bgr255", image_mean=DETECTRON_PIXEL_MEANS, image_std=(1.0, 1.0, 1.0))
IMAGE_FORMATS = ("rgb", "bgr255")


@dataclass
class ModelConfig(PixelBertConfig):
    """Everything a run needs to build and feed the model: the network's own fields
    (`pixel_bert.model.PixelBertConfig`, inherited) plus the image sizes and normalisation, the text
    length, the vocabulary file and the initial weights. Saved in every checkpoint."""
    # ---- initial weights ------------------------------------------------------------------------
    backbone_weights: Optional[str] = "imagenet"  # "imagenet" (torchvision enum), a state-dict file, a Detectron
                                          # .pkl (x152: X-152-32x8d-IN5k.pkl), or None
    # ---- image input -----------------------------------------------------------------------------
    image_short_side: int = 800           # keep-ratio resize [paper: 800/1333 for R50]
    image_long_side: int = 1333           # cap on the longer side after the resize [paper: 1333 for R50]
    image_mean: Tuple[float, float, float] = IMAGENET_MEAN  # of the torchvision weights [choice]
    image_std: Tuple[float, float, float] = IMAGENET_STD  # per-channel std of the normalisation [choice]
    image_format: str = "rgb"             # pixels the CNN's weights expect, before (x - mean) / std: "rgb" in
                                          # [0, 1] (torchvision) or "bgr255" (Caffe2/Detectron). A .pkl
                                          # backbone_weights sets bgr255 with Detectron's means and std 1
    image_jpeg_draft: bool = True         # decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when
                                          # that still covers the resize target and gives the same output
                                          # size: far less decoding work for large photos [choice]
    # ---- text input ------------------------------------------------------------------------------
    max_text_len: int = 40                # tokens incl. [CLS]/[SEP]; longer captions are truncated [choice]
    vocab_file: Optional[str] = None      # WordPiece vocab.txt; None = bert-base-uncased's (downloaded)
    bert_weights: Optional[str] = None    # HF BERT directory/file to initialise from ("bert-base-uncased")

    ALLOWED: ClassVar[Dict[str, Any]] = {  # see pixel_bert.model.allowed_values
        "image_short_side": (1, None), "image_long_side": (1, None), "image_format": IMAGE_FORMATS,
        "max_text_len": (3, None)}

    def __post_init__(self):
        super().__post_init__()
        if str(self.backbone_weights or "").endswith(".pkl"):
            for key, value in DETECTRON_INPUT.items():  # the input convention travels with the weights
                setattr(self, key, value)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        check_fields(self)
        if self.image_short_side > self.image_long_side:
            raise ValueError(f"image_short_side {self.image_short_side} > image_long_side {self.image_long_side}")
        if self.max_text_len > self.max_position_embeddings:
            raise ValueError(f"max_text_len {self.max_text_len} exceeds the {self.max_position_embeddings} text "
                             "positions of the embedding table (max_position_embeddings)")


@dataclass
class TrainConfig:
    # ---- optimisers [paper], with SOHO's unstated details [choice] --------------------------------
    cnn_lr: float = 1e-2                  # SGD for the CNN [paper]
    cnn_weight_decay: float = 5e-4        # SGD weight decay, on every CNN parameter [paper]
    cnn_momentum: float = 0.9             # [choice, from SOHO]
    lr: float = 1e-4                      # AdamW for the transformer and heads [paper]
    weight_decay: float = 1e-2            # AdamW weight decay [paper]
    no_decay_1d: bool = True              # no AdamW weight decay on 1-D parameters: biases, LayerNorm
                                          # weights and s_v (BERT practice) [choice]
    visual_embedding_optimizer: str = "adamw"  # eq. (5)'s 1x1 projection and s_v train with "adamw" (the
                                          # transformer's optimiser and lr: new layers at its width) or
                                          # "sgd" (the CNN's) [choice: the paper does not say]
    fused_optimizers: bool = True         # AdamW and SGD as one fused kernel over all parameters where this
                                          # torch has one (CPU and CUDA since torch 2.4; else the plain
                                          # loop): the same update to rounding, about 3x faster on CPU
    adam_betas: Tuple[float, float] = (0.9, 0.999)  # [choice, from SOHO]
    adam_eps: float = 1e-6                # [choice, from SOHO]
    warmup_steps: int = 1000              # linear warm-up in optimizer steps [choice, from SOHO]
    warmup_start_factor: float = 1.0 / 3  # warm-up starts at lr/3 [choice, from SOHO]
    grad_clip: float = 10.0               # max global grad norm, 0 = no clipping [choice, from SOHO]
    epochs: int = 40                      # [paper]
    decay_epochs: Tuple[int, ...] = (25, 35)  # lr x decay_factor at these epochs [paper]
    decay_factor: float = 0.1             # lr multiplier at each decay epoch [paper]
    freeze_backbone: bool = False         # the ResNet trunk gets no gradient and keeps its BatchNorm in
                                          # eval mode (retrieval fine-tuning freezes the CNN [paper])
    freeze_visual_proj: bool = False      # with freeze_backbone, also freeze eq. (5)'s 1x1 projection and
                                          # s_v [choice: false, they keep training]
    # ---- batch and precision ---------------------------------------------------------------------
    batch_size: int = 64                  # per process [paper: 64 per GPU x 64 GPUs = 4096]
    grad_accum_steps: int = 1             # micro-batches per optimizer step
    amp: str = "auto"                     # "auto": bf16 on GPUs with native bf16 (compute capability >= 8.0),
                                          # fp16 + loss scaling on older GPUs (V100), fp32 on CPU; or
                                          # "bf16" / "fp16" / "none" [choice]
    compile: bool = False                 # torch.compile the training model (checkpoints hold the plain
                                          # module, so a run resumes with compilation on or off)
    max_nonfinite_steps: int = 10         # consecutive non-finite losses / gradients tolerated before stopping
    # ---- pre-training tasks ----------------------------------------------------------------------
    mlm_probability: float = 0.15         # each word token is masked independently with this rate [paper]
    mlm_min_one_mask: bool = False        # force one masked token into captions that drew none (raises the
                                          # rate of short captions far above mlm_probability) [choice: off]
    mlm_replace_probs: Tuple[float, float] = (0.8, 0.1)  # [MASK] / random; rest unchanged [choice: BERT]
    mlm_never_mask: Tuple[str, ...] = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")  # tokens never
                                          # chosen for MLM [choice: BERT's special tokens]
    mlm_on_matched_only: bool = True      # MLM loss only on matched pairs: a mismatched caption says nothing
                                          # true about the image [choice]
    itm_negative_ratio: float = 0.5       # half the pairs get another image's caption [paper]
    mlm_probability_before_itm: Optional[float] = None  # masking rate while MLM runs alone (None = mlm_probability)
    mlm_words_before_itm: Tuple[str, ...] = ()  # while MLM runs alone, mlm_probability_before_itm applies to
                                          # these words only, the others keep mlm_probability (empty: to every
                                          # word): the words the image decides, so most predictions need the pixels
    itm_start_step: int = 0               # optimizer steps of MLM alone before ITM joins (0 = together from
                                          # the start, as the paper); the CPU demo's from-scratch CNN first
                                          # learns to see from MLM, since ITM at chance only adds noise
    itm_weight: float = 1.0               # L = L_MLM + itm_weight * L_ITM [paper: 1]; the CPU demo weighs ITM
                                          # more, or MLM's gradient drowns ITM's weak first signal
    itm_lr_factor: float = 1.0            # both optimisers' lr x this from itm_start_step on [choice: 1]; the
                                          # CPU demo lowers it: its masking drops from 60% to 15% there, and
                                          # the noisier MLM gradient would otherwise undo the grounding
    sample_pixels: bool = True            # random pixel sampling in pre-training [paper]
    # ---- data, logging, checkpoints --------------------------------------------------------------
    num_workers: int = 4                  # DataLoader worker processes per training process
    decode_images_on_device: bool = False  # workers only read each JPEG's bytes; the step decodes the batch on the
                                          # GPU (pixel_bert.device_decode): for hosts with too few cores per GPU
                                          # to decode (8 x H100, docs/costs.md); other images decode as before
    group_by_aspect_ratio: bool = True    # batches of similar aspect ratio to cut padding
    fatal_bad_samples: bool = False       # a bad sample is skipped and counted, unless this is set
    max_bad_sample_fraction: float = 0.05  # stop the run when more than this share of an epoch's samples
                                          # are bad (a wrong image folder must not train on nothing)
    bad_sample_check_after: int = 200     # samples an epoch must have seen before that share is checked
    log_every: int = 20                   # optimizer steps between progress lines
    ckpt_every: int = 1000                # optimizer steps between checkpoints (plus each epoch end)
    keep_checkpoints: int = 3             # newest checkpoints kept in the run folder
    seed: int = 0                         # seeds model init, data order and masking

    ALLOWED: ClassVar[Dict[str, Any]] = {  # see pixel_bert.model.allowed_values
        "cnn_lr": (0, None), "cnn_weight_decay": (0, None), "cnn_momentum": (0, 1), "lr": (0, None),
        "weight_decay": (0, None), "visual_embedding_optimizer": ("adamw", "sgd"), "adam_eps": (0, None),
        "warmup_steps": (0, None), "warmup_start_factor": (0, 1), "grad_clip": (0, None), "epochs": (1, None),
        "decay_factor": (0, None), "batch_size": (1, None), "grad_accum_steps": (1, None),
        "amp": ("auto", "bf16", "fp16", "none"), "max_nonfinite_steps": (0, None), "mlm_probability": (0, 1),
        "itm_negative_ratio": (0, 1), "mlm_probability_before_itm": (0, 1), "itm_start_step": (0, None),
        "itm_weight": (0, None), "itm_lr_factor": (0, None), "num_workers": (0, None),
        "max_bad_sample_fraction": (0, 1), "bad_sample_check_after": (1, None), "log_every": (1, None),
        "ckpt_every": (1, None), "keep_checkpoints": (1, None), "seed": (0, None)}

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self.decay_epochs = tuple(self.decay_epochs)
        self.mlm_replace_probs = tuple(self.mlm_replace_probs)
        self.mlm_never_mask = tuple(self.mlm_never_mask)
        self.mlm_words_before_itm = tuple(self.mlm_words_before_itm)
        check_fields(self)


# ---- presets: overrides of the defaults above ------------------------------------------------------

# The memory settings of the paper's presets (the comments on r50 and x152 below say why).
PAPER_MEMORY_SETTINGS = dict(backbone_frozen_stages=2, backbone_checkpointing=True, gradient_checkpointing=True)

MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's ablation model: ResNet-50, BERT-base, 800/1333, 100 sampled pixels. 64 per 32 GB V100
    # needs the memory settings (docs/costs.md) [choice, from SOHO, the same authors' later model, whose
    # configs freeze the stem and res2 and checkpoint both parts]
    "r50": dict(backbone="resnet50", bert_weights="bert-base-uncased", **PAPER_MEMORY_SETTINGS),
    # The paper's best model: ResNeXt-152 32x8d, 600/1000. Its ImageNet weights are Detectron's file
    # (torchvision has none), read from the working directory unless --backbone_weights says where.
    "x152": dict(backbone="resnext152_32x8d", backbone_weights="X-152-32x8d-IN5k.pkl", image_short_side=600,
                 image_long_side=1000, bert_weights="bert-base-uncased", **PAPER_MEMORY_SETTINGS),
    # Tests and the CPU demo: a ResNet-18 trunk to stage 2 (stride 8, then pool -> 16) on 64x64
    # images gives a 4x4 grid; a 4-layer, 128-wide transformer over the synthetic vocabulary. The CNN
    # starts from scratch (no download), so its BatchNorm learns its statistics. No dropout: the demo
    # sees each image once, and dropout delays its use of the pixels (docs/demo.md).
    "tiny": dict(backbone="resnet18", backbone_weights=None, backbone_stages=2, freeze_backbone_bn=False,
                 num_sampled_pixels=12, image_short_side=64, image_long_side=64,
                 vocab_size=64, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                 max_position_embeddings=64, max_text_len=24, num_answers=32, hidden_dropout=0.0,
                 attention_dropout=0.0),
}

# TrainConfig overrides by name. The downstream tasks' recipes are their modules' own ``presets``
# (`pixel_bert.tasks.TASKS`), with the synthetic demo's ``demo_overrides`` beside them.
TRAIN_PRESETS: Dict[str, Dict[str, Any]] = {
    "pretrain": dict(),
}

# The synthetic world's colour, kind and size words (pixel_bert.synthetic; tests/test_train.py checks
# the two agree): the words of its captions that only the image can tell.
SYNTHETIC_WORDS = ("red", "green", "blue", "yellow", "purple", "white", "circle", "square", "triangle", "cross",
                   "small", "large")

# train.py --config: name -> (model preset, train preset, train overrides). The demo's recipe differs from the
# paper's only where a tiny model trained from scratch for minutes needs it (higher lr, short
# warm-up, few epochs); the paper's presets are the paper's recipe unchanged.
PRETRAIN_RECIPES: Dict[str, Tuple[str, str, Dict[str, Any]]] = {
    # The demo's CNN starts from scratch and its captions have 4-10 words: MLM alone first, with the
    # words the image decides masked at 60% (the others at the paper's 15%), so the model learns to read
    # the pixels before ITM can use them; then the paper's MLM + ITM, at a lower lr (the sparser MLM
    # gradient would undo the grounding) and with ITM weighted up (its first signal is weak).
    # docs/demo.md has the measurements.
    "demo": ("tiny", "pretrain", dict(epochs=1, decay_epochs=(), batch_size=32, lr=1e-3, warmup_steps=60,
                                      mlm_probability_before_itm=0.6, mlm_words_before_itm=SYNTHETIC_WORDS,
                                      itm_start_step=400, itm_weight=10.0,
                                      itm_lr_factor=0.3, num_workers=1, log_every=50, ckpt_every=250,
                                      group_by_aspect_ratio=False)),
    "pretrain-r50": ("r50", "pretrain", {}),
    # x152 at 600x1000 does not fit 64 on a 32 GB V100 even with the memory settings (docs/costs.md): two
    # micro-batches of 32 per optimizer step keep the paper's 64 per GPU and 4096 per step
    "pretrain-x152": ("x152", "pretrain", dict(batch_size=32, grad_accum_steps=2)),
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
    if field_problem(ModelConfig, "hidden_act", act):
        raise ValueError(f"{config_json}: hidden_act {act!r} is not supported "
                         f"({field_problem(ModelConfig, 'hidden_act', act)})")
    mapped = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"], hidden_act=act,
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id", 0))
    return ModelConfig(**{**mapped, **overrides})
