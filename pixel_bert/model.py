"""Pixel-BERT: a CNN over image pixels and a BERT over words and feature pixels (Sec. 3.2 of the
paper; docs/paper.md maps every equation to the code).

The file follows the paper's equations, one class per concept:

    PixelBertConfig        the network's sizes and switches (the fields this file reads)
    VisualEmbedding        eq. (5)  v̂_i = v_i + s_v            CNN -> conv -> 2x2 max-pool -> pixels
    TextEmbedding          eq. (4)  ŵ_i = LayerNorm(w_i + p_i)  BERT's embedding layer
    SelfAttention/Block    eq. (6)  every token attends to every token, text and pixels alike
    PixelBert                       [CLS] ŵ_1..ŵ_n [SEP] v̂_1..v̂_k -> hidden states (B, L, H)

With ``images=None`` PixelBert is exactly BERT (a BERT checkpoint is verified this way).
This file needs only torch and torchvision: copy it into another codebase and it works.
Task heads live in `pixel_bert/heads.py`; pretrained weights in `pixel_bert/pretrained.py`; the run-level
configuration (image sizes, initial weights) in `pixel_bert/config.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet


# -------------------------------------------------------------------------------------------------
#                                       Configuration
# -------------------------------------------------------------------------------------------------

# BERT's activation names -> a constructor; each module builds its own instance.
ACTIVATIONS = {"gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}
ATTENTION_IMPLS = ("sdpa", "manual")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext152_32x8d")


def allowed_values(cls) -> Dict[str, Any]:
    """Field -> what it allows, from the ``ALLOWED`` tables of a config class and its bases: a tuple
    of strings lists the choices, a (low, high) pair bounds a number (None = unbounded)."""
    merged: Dict[str, Any] = {}
    for c in reversed(cls.__mro__):
        merged.update(c.__dict__.get("ALLOWED", {}))
    return merged


def field_problem(cls, name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not allowed for field ``name`` of config class ``cls`` (None when it is)."""
    allowed = allowed_values(cls).get(name)
    if allowed is None or value is None:
        return None
    if all(isinstance(a, str) for a in allowed):
        return None if value in allowed else f"must be one of {', '.join(allowed)}"
    low, high = allowed
    if isinstance(value, (str, tuple)):
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        return f"must be between {low} and {high}" if high is not None else f"must be >= {low}"
    return None


def check_fields(cfg) -> None:
    """Raise ValueError naming the first field of ``cfg`` whose value its class does not allow."""
    for name in allowed_values(type(cfg)):
        problem = field_problem(type(cfg), name, getattr(cfg, name))
        if problem:
            raise ValueError(f"{type(cfg).__name__}.{name} {problem}, got {getattr(cfg, name)!r}")


@dataclass
class PixelBertConfig:
    """The network's own configuration. Defaults are the paper's R50 model: ResNet-50 and BERT-base.
    [paper] marks what the paper states, [choice] what it leaves open (docs/paper.md has the table)."""
    # ---- visual embedding, eq. (5) --------------------------------------------------------------
    backbone: str = "resnet50"            # resnet18/34/50/101/152 or resnext152_32x8d [paper: R50, X152]
    backbone_stages: int = 4              # ResNet stages kept (4 = full trunk, stride 32); tiny uses fewer
    freeze_backbone_bn: bool = True       # BatchNorm statistics frozen: padded, variable-size batches of
                                          # 64/GPU would corrupt batch statistics (detection practice) [choice]
    visual_proj_kernel: int = 1           # conv from backbone channels to hidden size: 1x1 [choice]
    visual_proj_init_std: Optional[float] = None  # its initial weights' std; None = 1/sqrt(fan-in), so visual
                                          # tokens start at the text embeddings' scale whatever the trunk's
                                          # width [choice]
    num_sampled_pixels: int = 100         # feature pixels per image kept by random pixel sampling in
                                          # pre-training (Sec. 3.3) [paper]
    visual_pool: int = 2                  # 2x2 max-pool after the conv -> stride 64 [paper]; ceil mode, so
                                          # the last row/column of an odd grid is pooled too [choice]
    channels_last: bool = True            # CNN activations and weights in NHWC layout: the fast layout of
                                          # cuDNN's tensor-core convolutions; same results up to rounding
    backbone_checkpointing: bool = False  # recompute the CNN's stem and residual blocks in backward to save
                                          # memory (x152 at 600x1000, r50 at 64/GPU on a 32 GB card); needs
                                          # freeze_backbone_bn
    backbone_frozen_stages: int = 0       # the CNN's first stages run without gradients: 1 = the stem, 2 = the
                                          # stem and res2 (Detectron's FREEZE_AT=2), ...; they keep no
                                          # activations for backward and get no update; needs freeze_backbone_bn
    # ---- language embedding, eq. (4), and cross-modality transformer, eq. (6) --------------------
    vocab_size: int = 30522               # bert-base-uncased WordPiece vocabulary [choice]
    hidden_size: int = 768                # BERT-base sizes [paper: 12 layers; the rest BERT's, choice]
    num_layers: int = 12                  # transformer layers [paper]
    num_heads: int = 12                   # attention heads
    intermediate_size: int = 3072         # FFN width
    hidden_act: str = "gelu"              # FFN activation: gelu (BERT), gelu_new or relu
    hidden_dropout: float = 0.1           # dropout on embeddings and block outputs (BERT)
    attention_dropout: float = 0.1        # dropout on attention probabilities (BERT)
    max_position_embeddings: int = 512    # text positions the embedding table holds (BERT)
    type_vocab_size: int = 2              # token-type table (only type 0 is used: s_w of eq. 4)
    layer_norm_eps: float = 1e-12         # BERT's LayerNorm epsilon
    initializer_range: float = 0.02       # BERT init: normal(0, 0.02), zero bias, LayerNorm 1/0 [choice]
    pad_token_id: int = 0                 # id of [PAD] in the vocabulary
    attention_impl: str = "sdpa"          # "sdpa" (F.scaled_dot_product_attention) or "manual"
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward to save memory
    # ---- heads (pixel_bert/heads.py) -------------------------------------------------------------
    tie_mlm_decoder: bool = True          # MLM output layer tied to the word embeddings [choice]
    num_answers: int = 3129               # VQA answer vocabulary size [choice: community standard]
    classifier_expansion: int = 2         # the VQA and NLVR2 MLPs: Linear(in, k*h) -> GELU -> LayerNorm ->
                                          # Linear(k*h, out) with k this [choice: UNITER's and ViLT's 2]
    itm_init_std: Optional[float] = None  # the ITM classifier's initial std; None = 1/sqrt(hidden_size), so the
                                          # matching logit of eq. (8) of a LayerNorm'd [CLS] starts at unit
                                          # scale, as the visual tokens do (docs/demo.md) [choice]

    ALLOWED: ClassVar[Dict[str, Any]] = {  # see allowed_values
        "backbone": BACKBONES, "backbone_stages": (1, 4), "backbone_frozen_stages": (0, 5), "visual_proj_kernel": (1, None),
        "visual_proj_init_std": (0, None), "num_sampled_pixels": (0, None), "visual_pool": (1, None),
        "vocab_size": (1, None), "hidden_size": (1, None), "num_layers": (1, None), "num_heads": (1, None),
        "intermediate_size": (1, None), "hidden_act": tuple(ACTIVATIONS), "hidden_dropout": (0, 1),
        "attention_dropout": (0, 1), "max_position_embeddings": (2, None), "type_vocab_size": (1, None),
        "layer_norm_eps": (0, None), "initializer_range": (0, None), "attention_impl": ATTENTION_IMPLS,
        "num_answers": (1, None), "classifier_expansion": (1, None), "itm_init_std": (0, None)}

    @property
    def feature_stride(self) -> int:
        """Input pixels per feature pixel: the backbone's stride times the pool."""
        return 2 ** (self.backbone_stages + 1) * self.visual_pool

    def __post_init__(self):
        check_fields(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.backbone_frozen_stages > self.backbone_stages + 1:
            raise ValueError(f"backbone_frozen_stages must be 0..{self.backbone_stages + 1} (the stem, then each of "
                             f"the {self.backbone_stages} residual stages), got {self.backbone_frozen_stages}")


# -------------------------------------------------------------------------------------------------
#                                        Backbone
# -------------------------------------------------------------------------------------------------

_TORCHVISION_RESNETS = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
    "resnet152": (torchvision.models.resnet152, "ResNet152_Weights"),
}


def build_resnet(name: str) -> ResNet:
    """An un-initialised torchvision ResNet. ResNeXt-152 32x8d is not in torchvision's zoo, so it
    is built from torchvision's blocks: Bottleneck, [3, 8, 36, 3], 32 groups of width 8 [choice]."""
    if name == "resnext152_32x8d":
        return ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=8)
    if name not in _TORCHVISION_RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return _TORCHVISION_RESNETS[name][0](weights=None)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and a learnable affine: y = (x - mean) / std * w + b.

    Batches of padded, differently sized images would corrupt batch statistics, so the ImageNet
    statistics are kept (as detection models do) while the affine still trains end to end.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps = bn.eps
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # In x's dtype: under autocast the convolutions give bf16/fp16, and fp32 statistics would
        # otherwise promote every activation of the CNN back to fp32 (twice the memory traffic).
        scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        # one fused pass (x * scale + shift) instead of two
        return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d holding its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child))
        else:
            freeze_batchnorm(child)
    return module


class BackboneTrunk(nn.Module):
    """The ResNet without avgpool/fc, cut after ``stages`` residual stages (4 = stride 32).

    ``checkpointing``: in training with gradients, the stem and each residual block keep only their
    input and recompute their insides in backward (activation checkpointing): the CNN's activation
    memory drops to the block inputs, for about one more forward pass of the CNN.

    ``frozen_stages``: the stem (1) and then the first residual stages (2 = stem + res2, ...) have
    no gradients and run under ``torch.no_grad()``: nothing of theirs is kept for backward (at
    800x1333 the stem and res2 hold the largest feature maps) and backward stops at their output.
    """

    def __init__(self, resnet: ResNet, stages: int = 4, checkpointing: bool = False, frozen_stages: int = 0):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.Sequential(*[getattr(resnet, f"layer{i}") for i in range(1, stages + 1)])
        last_block = self.stages[-1][-1]
        self.out_channels = (last_block.bn3 if hasattr(last_block, "bn3") else last_block.bn2).num_features
        self.checkpointing = checkpointing
        self.frozen_stages = frozen_stages

    def freeze_first_stages(self) -> None:
        """No gradients for the ``frozen_stages`` first parts (call after the BatchNorm swap, whose
        FrozenBatchNorm2d affine parameters are new)."""
        for part in ([self.stem] + list(self.stages[:self.frozen_stages - 1])) if self.frozen_stages else []:
            part.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, trainable = images, self.stages
        if self.frozen_stages:
            with torch.no_grad():  # frozen: no weight gradients, so no activations kept for backward
                x = self.stem(images)
                for stage in self.stages[:self.frozen_stages - 1]:
                    x = stage(x)
            trainable = self.stages[self.frozen_stages - 1:]
        recompute = self.checkpointing and torch.is_grad_enabled()
        if not self.frozen_stages:
            x = torch.utils.checkpoint.checkpoint(self.stem, x, use_reentrant=False) if recompute else self.stem(x)
        if not recompute:
            return trainable(x)  # (B, C, H/stride, W/stride)
        for stage in trainable:
            for block in stage:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x


# -------------------------------------------------------------------------------------------------
#                                        Embeddings
# -------------------------------------------------------------------------------------------------

@dataclass
class VisualTokens:
    """Feature pixels ready for the transformer.

    embeddings: (B, K, H) v̂ of eq. (5); mask: (B, K) True on valid pixels;
    positions: (B, K) index of each token in the flattened (grid_h * grid_w) feature grid,
    so attention over sampled pixels can be put back on the grid; grid: (grid_h, grid_w).
    """
    embeddings: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    grid: Tuple[int, int]

    def __getitem__(self, index) -> "VisualTokens":
        """Select images (rows) — used to pair one image's features with many captions."""
        return VisualTokens(self.embeddings[index], self.mask[index], self.positions[index], self.grid)


class VisualEmbedding(nn.Module):
    """Eq. (5): v̂_i = v_i + s_v, with v_i the feature pixels of the CNN.

    CNN trunk -> conv to the transformer width -> 2x2 max-pool -> flatten -> + s_v. There is no
    positional embedding and no LayerNorm on visual tokens: eq. (5) is all [paper]. The padding
    mask of a batch of padded images is carried to the feature grid; ``num_sampled_pixels=k`` keeps k
    random valid pixels per image (random pixel sampling, Sec. 3.3); it applies in training mode
    only, since fine-tuning and testing use all pixels [paper].
    """

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.config = config
        if config.backbone_checkpointing and not config.freeze_backbone_bn:
            raise ValueError("backbone_checkpointing needs freeze_backbone_bn=True: the recomputation in "
                             "backward would update trainable BatchNorm running statistics a second time")
        if config.backbone_frozen_stages and not config.freeze_backbone_bn:
            raise ValueError("backbone_frozen_stages needs freeze_backbone_bn=True: a frozen stage's trainable "
                             "BatchNorm would still change its running statistics with every batch")
        self.backbone = BackboneTrunk(build_resnet(config.backbone), config.backbone_stages,
                                      config.backbone_checkpointing, config.backbone_frozen_stages)
        if config.freeze_backbone_bn:
            freeze_batchnorm(self.backbone)
        self.backbone.freeze_first_stages()
        k = config.visual_proj_kernel
        self.proj = nn.Conv2d(self.backbone.out_channels, config.hidden_size, k, padding=k // 2)
        # ceil mode: an odd backbone grid keeps its last row/column (800x1333 -> 25x42 -> 13x21, not 12x21)
        self.pool = nn.MaxPool2d(config.visual_pool, ceil_mode=True) if config.visual_pool > 1 else nn.Identity()
        self.semantic = nn.Parameter(torch.zeros(config.hidden_size))  # s_v, one vector for all pixels
        if config.channels_last:  # conv weights in NHWC too; .to(device) and load_state_dict keep it
            self.backbone.to(memory_format=torch.channels_last)
            self.proj.to(memory_format=torch.channels_last)
        self.backbone_frozen = False

    def freeze_backbone(self, include_projection: bool = False) -> None:
        """No gradients for the CNN trunk (and, if asked, the projection and s_v), and BatchNorm kept
        in eval mode across ``train()`` calls, so the frozen features do not drift with every batch
        (retrieval fine-tuning, Sec. 4 of the paper)."""
        frozen = [self.backbone] + ([self.proj] if include_projection else [])
        for p in [p for m in frozen for p in m.parameters()] + ([self.semantic] if include_projection else []):
            p.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> "VisualEmbedding":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def feature_mask(self, pixel_mask: Optional[torch.Tensor], batch: int, grid: Tuple[int, int],
                     device) -> torch.Tensor:
        """(B, gh*gw) validity of feature pixels: a cell is valid exactly when it covers at least one
        real input pixel. Feature cell (r, c) covers input rows [r*s, (r+1)*s) and columns
        [c*s, (c+1)*s), s = feature_stride (every stride-2 layer of the ResNet and the ceil-mode pool
        round up), and images are padded at the bottom and right, so the valid cells are the first
        ceil(rows / s) x ceil(columns / s)."""
        gh, gw = grid
        if pixel_mask is None:
            return torch.ones(batch, gh * gw, dtype=torch.bool, device=device)
        s = self.config.feature_stride
        cells_h = (pixel_mask.any(dim=2).sum(dim=1) + s - 1) // s  # (B,) ceil(valid rows / s)
        cells_w = (pixel_mask.any(dim=1).sum(dim=1) + s - 1) // s  # (B,) ceil(valid columns / s)
        rows = torch.arange(gh, device=device)[None, :, None] < cells_h[:, None, None]
        cols = torch.arange(gw, device=device)[None, None, :] < cells_w[:, None, None]
        return (rows & cols).flatten(1)  # (B, gh*gw)

    def forward(self, images: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None,
                num_sampled_pixels: int = 0) -> VisualTokens:
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.pool(self.proj(self.backbone(images)))   # (B, H, gh, gw)
        B, _, gh, gw = x.shape
        pixels = x.flatten(2).transpose(1, 2)              # (B, gh*gw, H); a free view when channels_last
        mask = self.feature_mask(pixel_mask, B, (gh, gw), x.device)
        positions = torch.arange(gh * gw, device=x.device).expand(B, -1)
        if num_sampled_pixels and self.training and num_sampled_pixels < gh * gw:
            # Random pixel sampling: uniform scores on valid pixels, -1 on padding; the top-k are
            # k valid pixels without replacement (padding is only picked if fewer than k are valid,
            # and stays masked). One vectorised op for the whole batch.
            scores = torch.rand(B, gh * gw, device=x.device).masked_fill(~mask, -1.0)
            positions = scores.topk(num_sampled_pixels, dim=1).indices  # (B, k)
            pixels = pixels.gather(1, positions[..., None].expand(-1, -1, pixels.shape[-1]))
            mask = mask.gather(1, positions)
        return VisualTokens(pixels + self.semantic, mask, positions, (gh, gw))


class TextEmbedding(nn.Module):
    """Eq. (4): ŵ_i = LayerNorm(w_i + p_i + s_w), BERT's embedding layer.

    s_w is BERT's token-type-0 vector (it folds into p_i as the paper notes), kept as a separate
    table so that a BERT checkpoint loads unchanged [choice].
    """

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position.num_embeddings:
            raise ValueError(f"text of {T} tokens exceeds max_position_embeddings "
                             f"{self.position.num_embeddings}; truncate it (max_text_len)")
        positions = torch.arange(T, device=input_ids.device)[None]       # (1, T)
        types = self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids)
        x = self.word(input_ids) + self.position(positions) + types        # (B, T, H)
        return self.dropout(self.norm(x))


# -------------------------------------------------------------------------------------------------
#                                  Cross-modality transformer
# -------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention over the joint sequence of eq. (6), with a key-padding mask.

    One fused projection gives Q, K, V. The fast path is F.scaled_dot_product_attention; the manual
    path computes the same numbers and also returns the attention probabilities (visualisation).
    ``key_mask`` None means nothing is padded: SDPA then gets no mask tensor, which lets it pick
    its fastest kernels (flash attention on GPU takes no mask at all).
    """

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_dropout

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], manual: bool = False):
        B, L, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=2)
        q, k, v = (t.view(B, L, self.num_heads, H // self.num_heads).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, nh, L, hs); key_mask: (B, L) True = attend, or None = attend to all
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L)
        dropout_p = self.dropout_p if self.training else 0.0
        probs = None
        if manual:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])          # (B, nh, L, L)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            y = F.dropout(probs, dropout_p, self.training) @ v                  # (B, nh, L, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, L, H)
        return self.out(y), probs


class TransformerBlock(nn.Module):
    """One BERT layer (post-LayerNorm): x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], manual: bool = False):
        a, probs = self.attention(x, key_mask, manual)
        x = self.attention_norm(x + self.dropout(a))
        x = self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))
        return x, probs


@dataclass
class PixelBertOutput:
    """hidden: (B, L, H) over [CLS] w [SEP] (T text positions, padded) then K visual tokens;
    mask: (B, L) True on real tokens; text_len: T; visual: the VisualTokens used (or None);
    attentions: per layer (B, nh, L, L) when requested."""
    hidden: torch.Tensor
    mask: torch.Tensor
    text_len: int
    visual: Optional[VisualTokens] = None
    attentions: Optional[List[torch.Tensor]] = None

    @property
    def cls(self) -> torch.Tensor:
        return self.hidden[:, 0]  # (B, H)


class PixelBert(nn.Module):
    """The whole model of Sec. 3.2 of the paper: eq. (5) + eq. (4) -> eq. (6) -> L BERT layers.

    forward(input_ids, attention_mask, images, pixel_mask, num_sampled_pixels) -> PixelBertOutput.
    The two halves are also callable apart, so that the CNN runs once per image when one image is
    paired with many texts (retrieval): ``visual = model.encode_image(images, pixel_mask)`` then
    ``model(input_ids, attention_mask, visual=visual[rows])``.
    """

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.config = config
        self.text_embedding = TextEmbedding(config)
        self.visual_embedding = VisualEmbedding(config)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        # BERT's initialisation [choice]: so that a model trained from scratch starts as BERT does.
        # The CNN keeps torchvision's own initialisation (or its ImageNet weights, loaded later).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VisualEmbedding):
            # The projection conv at std 1/sqrt(fan-in): visual tokens start at the LayerNorm'd words'
            # unit scale whatever the trunk's width (docs/demo.md). s_v starts at zero.
            fan_in = module.proj.in_channels * module.proj.kernel_size[0] * module.proj.kernel_size[1]
            std = self.config.visual_proj_init_std or fan_in ** -0.5
            nn.init.normal_(module.proj.weight, std=std)
            nn.init.zeros_(module.proj.bias)
            nn.init.zeros_(module.semantic)

    def freeze_backbone(self, include_projection: bool = False) -> None:
        """See `VisualEmbedding.freeze_backbone`."""
        self.visual_embedding.freeze_backbone(include_projection)

    def encode_image(self, images: torch.Tensor, pixel_mask: Optional[torch.Tensor] = None,
                     num_sampled_pixels: int = 0) -> VisualTokens:
        """Eq. (5) for a batch of (padded) images (B, 3, H, W) -> VisualTokens."""
        return self.visual_embedding(images, pixel_mask, num_sampled_pixels)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None, pixel_mask: Optional[torch.Tensor] = None,
                num_sampled_pixels: int = 0, visual: Optional[VisualTokens] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                output_attentions: bool = False) -> PixelBertOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        x = self.text_embedding(input_ids, token_type_ids)                  # (B, T, H)
        mask = attention_mask
        if visual is None and images is not None:
            visual = self.encode_image(images, pixel_mask, num_sampled_pixels)
        if visual is not None:
            if visual.embeddings.shape[0] != x.shape[0]:
                raise ValueError(f"{visual.embeddings.shape[0]} images for {x.shape[0]} texts")
            x = torch.cat([x, visual.embeddings.to(x.dtype)], dim=1)       # (B, T+K, H), eq. (6)
            mask = torch.cat([attention_mask, visual.mask], dim=1)          # (B, T+K)
        manual = output_attentions or self.config.attention_impl == "manual"
        # Decided once per forward (one device sync, not one per layer): with nothing padded the
        # layers get no mask, and SDPA can use its mask-free kernels.
        key_mask = None if bool(mask.all()) else mask
        attentions = [] if output_attentions else None
        for layer in self.layers:
            if self.config.gradient_checkpointing and self.training and not output_attentions:
                x, probs = torch.utils.checkpoint.checkpoint(layer, x, key_mask, manual, use_reentrant=False)
            else:
                x, probs = layer(x, key_mask, manual)
            if output_attentions:
                attentions.append(probs)
        return PixelBertOutput(x, mask, input_ids.shape[1], visual, attentions)
