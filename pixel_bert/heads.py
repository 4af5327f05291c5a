"""Task heads on top of PixelBert, and the task models that combine them (Sec. 3.3 and 4.2 of the paper).

    MLMHead        eq. (7)  BERT's transform + decoder tied to the word embeddings
    ITMHead        eq. (8)  S_θ(w, I) = sigmoid(linear([CLS]))
    VQAHead        sec. 4.2 Linear(H, 2H) -> GELU -> LayerNorm -> Linear(2H, answers), BCE on soft scores
    NLVR2Head      sec. 4.2 [CLS_left ; CLS_right] -> MLP -> true/false
    RetrievalHead  sec. 4.2 a linear score on [CLS]

Every task model keeps the shared network under ``.bert``, so a pre-training checkpoint's
``bert.*`` tensors load into any fine-tuning model (see pixel_bert.factory.load_checkpoint_weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import ACTIVATIONS, PixelBert, PixelBertConfig, PixelBertOutput


def init_bert_style(module: nn.Module, std: float):
    """BERT's initialisation for head layers: normal(0, std) weights, zero biases, LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MLMHead(nn.Module):
    """Eq. (7): P(w_m | w_\\m, I) = softmax(decoder(LN(act(dense(h_m))))).

    The decoder shares its weight with the word embedding table [choice, as BERT], plus its own bias.
    """

    def __init__(self, config: PixelBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        init_bert_style(self, config.initializer_range)
        if config.tie_mlm_decoder:
            self.decoder_weight = word_embeddings.weight  # tied: the same Parameter object
        else:
            self.decoder_weight = nn.Parameter(word_embeddings.weight.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.act(self.dense(hidden)))  # (..., H)
        return F.linear(x, self.decoder_weight, self.bias)  # (..., vocab)


class ITMHead(nn.Module):
    """Eq. (8): the matching score S_θ(w, I) = sigmoid(w^T h_[CLS] + b); returns the logit.

    w starts at std ``itm_init_std`` (default 1/sqrt(H)): the LayerNorm'd h_[CLS] has unit scale, so
    the logit does too. No other loss trains h_[CLS], so ITM must first route the words' match signal
    into it, and its gradient into the transformer is proportional to w, which BERT's 0.02 keeps
    weak (w even shrinks while ITM is at chance; docs/demo.md)."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.classifier = nn.Linear(config.hidden_size, 1)
        init_bert_style(self, config.itm_init_std or config.hidden_size ** -0.5)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(cls).squeeze(-1)  # (B,)


def _mlp(in_dim: int, hidden: int, out_dim: int, eps: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps),
                         nn.Linear(hidden, out_dim))


class VQAHead(nn.Module):
    """Sec. 4.2: Linear(H, 2H) -> GELU -> LayerNorm -> Linear(2H, num_answers) on [CLS] [choice:
    ``classifier_expansion`` = 2]."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        width = config.classifier_expansion * config.hidden_size
        self.mlp = _mlp(config.hidden_size, width, config.num_answers, config.layer_norm_eps)
        init_bert_style(self, config.initializer_range)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.mlp(cls)  # (B, num_answers) logits for BCE on soft scores


class NLVR2Head(nn.Module):
    """Sec. 4.2: the two pairs' [CLS] outputs concatenated -> MLP -> 2 logits (false, true)."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.mlp = _mlp(2 * config.hidden_size, config.classifier_expansion * config.hidden_size, 2,
                        config.layer_norm_eps)
        init_bert_style(self, config.initializer_range)

    def forward(self, cls_left: torch.Tensor, cls_right: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([cls_left, cls_right], dim=-1))  # (B, 2)


class RetrievalHead(nn.Module):
    """Sec. 4.2: one linear score per (image, text) pair on [CLS]; ranked by softmax over 21."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.score = nn.Linear(config.hidden_size, 1)
        init_bert_style(self, config.initializer_range)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.score(cls).squeeze(-1)  # (B,)


# -------------------------------------------------------------------------------------------------
#                                        Task models
# -------------------------------------------------------------------------------------------------

class PixelBertForPreTraining(nn.Module):
    """PixelBert + MLM head (eq. 7) + ITM head (eq. 8): one forward pass serves both losses."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.config = config
        self.bert = PixelBert(config)
        self.mlm = MLMHead(config, self.bert.text_embedding.word)
        self.itm = ITMHead(config)

    def forward(self, input_ids, attention_mask, images=None, pixel_mask=None, num_sampled_pixels: int = 0,
                **kwargs):
        out: PixelBertOutput = self.bert(input_ids, attention_mask, images, pixel_mask, num_sampled_pixels, **kwargs)
        text_hidden = out.hidden[:, : out.text_len]              # (B, T, H)
        return out, self.mlm(text_hidden), self.itm(out.cls)     # (B, T, V), (B,)


class PixelBertForVQA(nn.Module):
    """PixelBert + VQAHead (Sec. 4.2)."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.config = config
        self.bert = PixelBert(config)
        self.vqa = VQAHead(config)

    def forward(self, input_ids, attention_mask, images=None, pixel_mask=None, **kwargs):
        out = self.bert(input_ids, attention_mask, images, pixel_mask, **kwargs)
        return self.vqa(out.cls)  # (B, num_answers)


class PixelBertForNLVR2(nn.Module):
    """PixelBert + NLVR2Head: each (image, sentence) pair goes through the model on its own."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.config = config
        self.bert = PixelBert(config)
        self.nlvr2 = NLVR2Head(config)

    def forward(self, input_ids, attention_mask, images_left, pixel_mask_left, images_right,
                pixel_mask_right, **kwargs):
        B = input_ids.shape[0]
        # Both pairs in one batched pass: the sentence twice, the left images then the right ones.
        out = self.bert(input_ids.repeat(2, 1), attention_mask.repeat(2, 1),
                        *_stack_pair(images_left, pixel_mask_left, images_right, pixel_mask_right), **kwargs)
        return self.nlvr2(out.cls[:B], out.cls[B:])  # (B, 2)


def _stack_pair(images_a, mask_a, images_b, mask_b):
    """Concatenate two padded image batches along the batch axis, padding both to a common size."""
    H = max(images_a.shape[-2], images_b.shape[-2])
    W = max(images_a.shape[-1], images_b.shape[-1])

    def pad(images, mask):
        dh, dw = H - images.shape[-2], W - images.shape[-1]
        if mask is None:
            mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        return F.pad(images, (0, dw, 0, dh)), F.pad(mask, (0, dw, 0, dh), value=False)

    (ia, ma), (ib, mb) = pad(images_a, mask_a), pad(images_b, mask_b)
    return torch.cat([ia, ib]), torch.cat([ma, mb])


class PixelBertForRetrieval(nn.Module):
    """PixelBert + RetrievalHead. ``score(input_ids, attention_mask, visual)`` scores pairs whose
    image features were computed once by ``bert.encode_image`` (the CNN never runs per pair)."""

    def __init__(self, config: PixelBertConfig):
        super().__init__()
        self.config = config
        self.bert = PixelBert(config)
        self.retrieval = RetrievalHead(config)

    def forward(self, input_ids, attention_mask, images=None, pixel_mask=None, visual=None, **kwargs):
        out = self.bert(input_ids, attention_mask, images, pixel_mask, visual=visual, **kwargs)
        return self.retrieval(out.cls)  # (B,)


TASK_MODELS = {
    "pretrain": PixelBertForPreTraining,
    "vqa": PixelBertForVQA,
    "nlvr2": PixelBertForNLVR2,
    "retrieval": PixelBertForRetrieval,
}
