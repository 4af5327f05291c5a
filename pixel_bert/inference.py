"""Inference with a trained Pixel-BERT checkpoint: matching, masked words, VQA answers, attention maps.

    from pixel_bert.inference import PixelBertPredictor
    p = PixelBertPredictor.from_checkpoint("runs/demo/model.pt")          # loads once
    p = PixelBertPredictor.from_pretrained("runs/demo/model")             # the same, from the model folder
    p.match("img.png", "a red circle above a blue square")             # ITM probability, eq. (8)
    p.fill_mask("img.png", "the red shape is a [MASK]")                 # MLM top-k words, eq. (7)
    p.rank("a red circle", ["a.png", "b.png", "c.png"], top_k=2)       # [(index, score)], best first
    p.rank("a.png", ["a red circle", "a green cross"])                 # captions for one image
    p.answer("img.png", "what colour is the circle ?")                  # VQA (a "vqa" checkpoint)
    maps = p.attention_maps("img.png", "a red circle", layer=0)         # Sec. 4.4 of the paper
    maps.map_for("red")                                                 # (gh, gw) attention over pixels

Every method takes one image (a `PIL.Image` or a path) or a list of them, and one text or a list;
lists are run as one padded batch (`pixel_bert.images.pad_images`), so padding pixels are masked
exactly as in training. Everything runs under ``torch.no_grad()`` in eval mode, which also turns
random pixel sampling off: inference uses all feature pixels (Sec. 3.3 of the paper).

Attention maps (Sec. 4.4, Figure 3)
-----------------------------------
The joint sequence of eq. (6) is ``[CLS] w_1 .. w_n [SEP] v_1 .. v_k``. Row ``i`` of a layer's
attention probabilities (B, heads, L, L) is how text token ``i`` spreads its attention over *all*
tokens, words and feature pixels together (each row sums to 1). The map of a token is the pixel
part of that row, put back on the feature grid with ``VisualTokens.positions``.

By default the pixel part is **renormalised to sum to 1 over the pixels** (``renormalize=True``):
the map then says *where in the image* the token looks, independent of *how much* it looks at the
image at all, which is what a picture of the map should show. The un-renormalised share of the
row that goes to pixels is kept as ``AttentionMaps.pixel_mass`` (per token), and
``renormalize=False`` gives the raw probabilities. With ``head=None`` the heads' probabilities are
averaged first (the paper does not say which heads it shows; the mean is this project's choice) and
then renormalised, so heads that look at the image more weigh more in the map.

How well a word's map lands on its object is measured on the synthetic world by
benchmarks/attention_in_boxes.py.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from .errors import UserError
from .images import ImageTransform, load_image, pad_images
from .retrieval_scoring import encode_images, score_rows
from .saved_model import load_saved_model
from .tokenizer import WordPieceTokenizer

ImageLike = Union[Image.Image, str, os.PathLike]

# Which head each method needs, by the attribute the task model keeps it under (pixel_bert.heads).
_HEAD_NAMES = {"itm": "an image-text matching (ITM) head, i.e. a pre-training checkpoint (task 'pretrain')",
               "mlm": "a masked-language-model (MLM) head, i.e. a pre-training checkpoint (task 'pretrain')",
               "vqa": "a VQA head, i.e. a checkpoint fine-tuned with task 'vqa' that stores its answer "
                      "list under 'answers'"}


class TextTruncatedWarning(UserWarning):
    """A text was longer than the model's ``max_text_len`` tokens and was cut (the end is lost)."""


@dataclass
class AttentionMaps:
    """Attention of each text token over the feature pixels of one image (Sec. 4.4 of the paper).

    tokens: the WordPieces of the text as the model read it, ``[CLS]`` and ``[SEP]`` included
        (so index i is sequence position i);
    maps: (T, gh, gw) float tensor; row i is token i's attention over the feature grid, summing to
        1 over the grid when ``renormalized`` (else: the raw probabilities, summing to pixel_mass);
    pixel_mass: (T,) share of each token's attention (before renormalising) that goes to pixels;
    grid: (gh, gw) of the feature grid; image_size: (width, height) of the image the model saw
        (after the keep-ratio resize); stride: input pixels per feature cell, so the grid covers
        ``extent`` = (gw * stride, gh * stride) pixels, the image at its top-left and padding beyond;
    layer: the transformer layer (0 = first); head: the head, or None for the mean of the heads.
    """
    tokens: List[str]
    maps: torch.Tensor
    pixel_mass: torch.Tensor
    grid: Tuple[int, int]
    image_size: Tuple[int, int]
    stride: int
    layer: int
    head: Optional[int]
    renormalized: bool

    @property
    def extent(self) -> Tuple[int, int]:
        """(width, height) in resized-image pixels that the feature grid covers (>= image_size)."""
        return self.grid[1] * self.stride, self.grid[0] * self.stride

    def index(self, token: str, occurrence: int = 0) -> int:
        """Sequence position of the ``occurrence``-th (0 = first) time ``token`` appears."""
        hits = [i for i, t in enumerate(self.tokens) if t == token.lower() or t == token]
        if len(hits) <= occurrence:
            raise KeyError(f"token {token!r} not in the text's tokens {self.tokens}")
        return hits[occurrence]

    def map_for(self, token: str, occurrence: int = 0) -> torch.Tensor:
        """(gh, gw) map of a token, found by its WordPiece string (e.g. "red")."""
        return self.maps[self.index(token, occurrence)]


def _user_stacklevel() -> int:
    """warnings.warn stacklevel that points at the user's line: the first frame outside this file
    and outside torch (whose no_grad decorator adds a frame of its own)."""
    frame, level = sys._getframe(1), 1
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(torch_dir)):
        frame, level = frame.f_back, level + 1
    return level


def _as_list(x, kinds) -> Tuple[list, bool]:
    """(list of items, True if a single item was given)."""
    if isinstance(x, kinds):
        return [x], True
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("got an empty list")
        return list(x), False
    raise TypeError(f"expected {' or '.join(k.__name__ for k in kinds)} or a list of them, got {type(x).__name__}")


def _pair_up(images: list, texts: list) -> Tuple[list, list]:
    """Equal lengths pair item by item; a single image or text is paired with every one of the other."""
    if len(images) == len(texts):
        return images, texts
    if len(images) == 1:
        return images * len(texts), texts
    if len(texts) == 1:
        return images, texts * len(images)
    raise ValueError(f"{len(images)} images and {len(texts)} texts: give equal numbers, or one of either")


def _is_image(item) -> bool:
    """A PIL image, a path object, or a string naming an existing file."""
    return isinstance(item, (Image.Image, os.PathLike)) or (isinstance(item, str) and os.path.isfile(item))


class _AsMatchReadsThem:
    """The ``transform.load`` that `pixel_bert.retrieval_scoring.encode_images` calls, for what the predictor
    accepts: a PIL image as it is, a path through `load_image`, then the predictor's transform (the
    pixels `match` sees)."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def load(self, item: ImageLike) -> torch.Tensor:
        return self.transform(item if isinstance(item, Image.Image) else load_image(item))


class _ITMScore(torch.nn.Module):
    """A pre-training model as `pixel_bert.retrieval_scoring.score_rows` calls a retrieval model:
    (input_ids, attention_mask, visual) -> one score per pair, here the ITM logit of eq. (8)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, visual):
        return self.model.itm(self.model.bert(input_ids, attention_mask, visual=visual).cls)


class PixelBertPredictor:
    """A loaded Pixel-BERT task model with its tokenizer and image transform, ready for inference.

    Build it with `from_checkpoint`. The model's sizes (image side, text length, vocabulary,
    layers) are all read from the checkpoint, never assumed.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: WordPieceTokenizer, task: str,
                 answers: Optional[Sequence[str]] = None, source: str = "<model>", device="cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.task = task
        self.answers = list(answers) if answers is not None else None
        self.source = source
        self.transform = ImageTransform.from_config(self.config)

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str, device="cpu") -> "PixelBertPredictor":
        """Load a pixel-bert checkpoint once: a ``model.pt`` of train.py or of a fine-tuning run, or
        a model folder (``RUN/model/`` of the same runs, or one written by ``python -m pixel_bert.export``).

        The task model is the checkpoint's own ("pretrain" gives the MLM and ITM heads, "vqa" the VQA
        head), every tensor of it read from the file; the vocabulary and answers are the checkpoint's
        (`saved_model.load_saved_model`). ``from_pretrained`` is the same function.
        """
        saved = load_saved_model(path)
        return cls(saved.model, saved.tokenizer(), saved.task, saved.answers, source=path, device=device)

    from_pretrained = from_checkpoint  # the name the ecosystem loads a model folder with

    def _head(self, name: str) -> torch.nn.Module:
        if not hasattr(self.model, name):
            raise ValueError(f"{self.source}: this is a {self.task!r} checkpoint "
                             f"({type(self.model).__name__}); this method needs {_HEAD_NAMES[name]}")
        return getattr(self.model, name)

    # ---- inputs ------------------------------------------------------------------------------------

    def _images(self, images: Sequence[ImageLike]) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]:
        """Load (paths -> `load_image`, which raises ImageLoadError naming the file), resize and
        normalise as in training, pad into one batch. Returns (images, pixel_mask, sizes (w, h))."""
        tensors = []
        for img in images:
            if not isinstance(img, Image.Image):
                img = load_image(img)
            tensors.append(self.transform(img))
        batch, mask = pad_images(tensors, self.model.config.feature_stride)
        sizes = [(t.shape[2], t.shape[1]) for t in tensors]
        return batch.to(self.device), mask.to(self.device), sizes

    def _texts(self, texts: Sequence[str]):
        """Tokenise into a padded batch, warning (TextTruncatedWarning) for each text longer than
        ``max_text_len``; the tokenizer keeps the start and closes with [SEP]."""
        limit = self.config.max_text_len
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            if not text.strip():
                raise UserError("an empty text: give the words to match, fill or answer")
            n = len(self.tokenizer.encode(text, max_length=10 ** 9))
            if n > limit:
                warnings.warn(f"text of {n} tokens truncated to the model's max_text_len {limit}: "
                              f"{text[:60]!r}...", TextTruncatedWarning, stacklevel=_user_stacklevel())
        batch = self.tokenizer(list(texts), max_length=limit)
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

    # ---- tasks ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def match(self, images, texts) -> Union[float, torch.Tensor]:
        """Image-text matching, eq. (8): S = sigmoid(ITM logit), the probability that the text
        describes the image. One image and one text give a float; lists give a (N,) CPU tensor
        (equal lengths are paired item by item; one image or one text is paired with each of the
        other, and that image goes through the CNN once)."""
        itm = self._head("itm")
        image_list, single_image = _as_list(images, (Image.Image, str, os.PathLike))
        text_list, single_text = _as_list(texts, (str,))
        if len(image_list) == 1 and len(text_list) > 1:
            # one image, many texts: run the CNN once and reuse its visual tokens (PixelBert docs)
            pixels, pixel_mask, _ = self._images(image_list)
            visual = self.model.bert.encode_image(pixels, pixel_mask)
            ids, mask = self._texts(text_list)
            out = self.model.bert(ids, mask, visual=visual[[0] * len(text_list)])
        else:
            image_list, text_list = _pair_up(image_list, text_list)
            pixels, pixel_mask, _ = self._images(image_list)
            ids, mask = self._texts(text_list)
            out = self.model.bert(ids, mask, pixels, pixel_mask)
        probs = torch.sigmoid(itm(out.cls).float()).cpu()
        return probs.item() if single_image and single_text else probs

    @torch.no_grad()
    def rank(self, query, candidates, top_k: Optional[int] = None, image_batch_size: int = 16,
             pairs_per_batch: int = 256) -> List[Tuple[int, float]]:
        """Rank ``candidates`` for ``query``: ``rank(text, images)`` orders images (PIL images or
        paths) for a caption, ``rank(image, texts)`` orders captions for an image. Returns
        ``[(index into candidates, score), ...]``, best first (ties in candidate order), the
        ``top_k`` best or all.

        The score is `match`'s ITM probability for a pre-training checkpoint and the retrieval head's
        score (a logit) for a retrieval checkpoint. As in the retrieval evaluation, every image goes
        through the CNN once (`pixel_bert.retrieval_scoring.encode_images`, ``image_batch_size`` images at a
        time) and the pairs are scored in batches of about ``pairs_per_batch`` from those visual
        tokens (`pixel_bert.retrieval_scoring.score_rows`), under the evaluation's autocast: on CPU the scores
        are `match`'s to float rounding, on a GPU they are bf16/fp16 figures (``match`` runs fp32).
        A query string is an image when it names an existing file, else a caption."""
        if self.task == "pretrain":
            scorer, to_score = _ITMScore(self.model), torch.sigmoid
        elif self.task == "retrieval":
            scorer, to_score = self.model, (lambda logits: logits)
        else:
            raise ValueError(f"{self.source}: rank() scores pairs with an ITM head (task 'pretrain') or a "
                             f"retrieval head (task 'retrieval'); this is a {self.task!r} checkpoint")
        if isinstance(query, (list, tuple)):
            raise TypeError("rank() takes one query (a text or an image) and a list of candidates")
        candidates, _ = _as_list(candidates, (Image.Image, str, os.PathLike))
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None for all), got {top_k}")
        if _is_image(query):
            images, texts = [query], candidates
        elif not isinstance(query, str):
            raise TypeError(f"the query must be a text or an image (PIL image or path), got {type(query).__name__}")
        elif all(isinstance(c, str) and not os.path.isfile(c) for c in candidates):
            raise ValueError(f"rank(): {query!r} is not an image file and none of the {len(candidates)} "
                             "candidates is one either: rank(text, images) needs PIL images or paths of "
                             "existing files, rank(image, texts) an image that exists")
        else:
            images, texts = candidates, [query]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("rank(image, texts): every candidate must be a text when the query is an image")
        visual = encode_images(self.model, images, range(len(images)), _AsMatchReadsThem(self.transform),
                               self.device, image_batch_size, log=lambda *_: None)
        ids, mask = self._texts(texts)
        # score_rows tiles images x captions at about sqrt(pairs) each, and gives a single image's
        # tile all pairs_per_batch pairs as captions
        scores = to_score(score_rows(scorer, visual, ids, mask, self.device, pairs_per_batch)).flatten()
        order = scores.argsort(descending=True, stable=True)[:top_k]
        return [(int(i), float(scores[i])) for i in order]

    @torch.no_grad()
    def fill_mask(self, image, text, top_k: int = 5):
        """Masked language modelling, eq. (7): for each ``[MASK]`` in ``text`` (in order), the
        ``top_k`` words with their probabilities, highest first: ``[[(word, p), ...], ...]``.
        Probabilities are the softmax over the whole vocabulary (so each list sums to at most 1).
        Lists of images/texts give one such result per pair."""
        mlm = self._head("mlm")
        if top_k < 1:
            raise UserError(f"top_k must be at least 1, got {top_k}")
        image_list, single_image = _as_list(image, (Image.Image, str, os.PathLike))
        text_list, single_text = _as_list(text, (str,))
        image_list, text_list = _pair_up(image_list, text_list)
        pixels, pixel_mask, _ = self._images(image_list)
        ids, mask = self._texts(text_list)
        is_mask = ids == self.tokenizer.mask_id                                  # (B, T)
        missing = [t for t, m in zip(text_list, is_mask.any(dim=1).tolist()) if not m]
        if missing:
            raise ValueError(f"no [MASK] token in {missing[0]!r} (after truncation to "
                             f"{self.config.max_text_len} tokens): write [MASK] where a word should be predicted")
        out = self.model.bert(ids, mask, pixels, pixel_mask)
        logits = mlm(out.hidden[:, : out.text_len][is_mask])                      # (M, V), masks in order
        probs, idx = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        words = [[(self.tokenizer.vocab[i], p) for i, p in zip(row_i, row_p)]
                 for row_i, row_p in zip(idx.tolist(), probs.tolist())]
        counts = is_mask.sum(dim=1).tolist()
        results, start = [], 0
        for c in counts:  # split the flat list of masks back into one list per text
            results.append(words[start: start + c])
            start += c
        return results[0] if single_image and single_text else results

    @torch.no_grad()
    def answer(self, image, question, top_k: int = 5):
        """VQA (Sec. 4.2 of the paper): the ``top_k`` answers with their scores, highest first:
        ``[(answer, p), ...]``. VQA is trained with binary cross-entropy on soft scores, so each
        answer's p = sigmoid(logit) is an independent score in [0, 1], not a softmax: the scores
        need not sum to 1. Needs a checkpoint of task "vqa" with its ``answers`` list."""
        vqa = self._head("vqa")
        if self.answers is None:
            raise ValueError(f"{self.source}: no 'answers' list in the checkpoint; answer() needs it")
        image_list, single_image = _as_list(image, (Image.Image, str, os.PathLike))
        text_list, single_text = _as_list(question, (str,))
        image_list, text_list = _pair_up(image_list, text_list)
        pixels, pixel_mask, _ = self._images(image_list)
        ids, mask = self._texts(text_list)
        scores = torch.sigmoid(vqa(self.model.bert(ids, mask, pixels, pixel_mask).cls).float())
        p, idx = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
        results = [[(self.answers[i], s) for i, s in zip(ri, rp)] for ri, rp in zip(idx.tolist(), p.tolist())]
        return results[0] if single_image and single_text else results

    # ---- attention (Sec. 4.4 of the paper) ----------------------------------------------------------

    @torch.no_grad()
    def _forward_attentions(self, images: list, texts: list):
        """One batched forward pass returning the model output with every layer's probabilities."""
        pixels, pixel_mask, sizes = self._images(images)
        ids, mask = self._texts(texts)
        out = self.model.bert(ids, mask, pixels, pixel_mask, output_attentions=True)
        return out, ids, mask, sizes

    def _layer_index(self, layer: int) -> int:
        n = self.config.num_layers
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1}, or -1 for the last)")
        return layer % n

    def _maps_from(self, out, ids, mask, sizes, layer: int, head: Optional[int],
                   renormalize: bool) -> List[AttentionMaps]:
        """Cut the text-to-pixel block out of one layer's probabilities and put it on the grid."""
        layer = self._layer_index(layer)
        probs = out.attentions[layer]                                   # (B, nh, L, L), rows sum to 1
        nh = probs.shape[1]
        if head is None:
            probs = probs.mean(dim=1)                                   # (B, L, L)
        else:
            if not -nh <= head < nh:
                raise ValueError(f"head {head} out of range: the model has {nh} heads")
            probs = probs[:, head]
        T = out.text_len
        visual = out.visual
        gh, gw = visual.grid
        to_pixels = probs[:, :T, T:].float()                            # (B, T, K) text rows, pixel columns
        to_pixels = to_pixels * visual.mask[:, None, :]                 # padded pixels get exactly nothing
        mass = to_pixels.sum(-1)                                        # (B, T) share of the row on pixels
        if renormalize:
            to_pixels = to_pixels / mass.clamp_min(1e-12)[..., None]
        # Back onto the grid: token k of the visual sequence sits at cell positions[k]. In eval mode
        # positions are 0..gh*gw-1, but scattering makes this right for sampled pixels too.
        B = to_pixels.shape[0]
        grid = to_pixels.new_zeros(B, T, gh * gw)
        grid.scatter_(2, visual.positions[:, None, :].expand(-1, T, -1), to_pixels)
        grid = grid.view(B, T, gh, gw).cpu()
        result = []
        for b in range(B):  # one AttentionMaps per image, cut to its own real tokens
            n = int(mask[b].sum())
            tokens = self.tokenizer.convert_ids_to_tokens(ids[b, :n].tolist())
            result.append(AttentionMaps(tokens, grid[b, :n], mass[b, :n].cpu(), (gh, gw), sizes[b],
                                        self.config.feature_stride, layer, head, renormalize))
        return result

    def attention_maps(self, image, text, layer: int = 0, head: Optional[int] = None,
                       renormalize: bool = True):
        """Each text token's attention over the feature pixels, on the feature grid (Sec. 4.4 of the paper).

        ``layer``: transformer layer, 0 = the first (the paper's figure is said to be from the
        first layer; -1 = the last). ``head``: one head, or None for the mean of the heads.
        ``renormalize``: True (default) makes each token's map sum to 1 over the pixels, the
        right scale for a picture; False keeps the raw probabilities of the full joint softmax.
        Returns an `AttentionMaps` (lists of images/texts: a list of them, one per pair).
        """
        image_list, single_image = _as_list(image, (Image.Image, str, os.PathLike))
        text_list, single_text = _as_list(text, (str,))
        image_list, text_list = _pair_up(image_list, text_list)
        out, ids, mask, sizes = self._forward_attentions(image_list, text_list)
        maps = self._maps_from(out, ids, mask, sizes, layer, head, renormalize)
        return maps[0] if single_image and single_text else maps

    # ---- everything at once, for the attention explorer (Sec. 4.4 of the paper) ---------------------

    @torch.no_grad()
    def inspect(self, image: ImageLike, text: str, top_k: int = 5) -> "Inspection":
        """One forward pass over one (image, text) pair that keeps everything a viewer may ask for:
        every layer's and head's attention between the words and the feature pixels, in both
        directions, and the outputs of the checkpoint's own heads (ITM score, the top ``top_k``
        fill-ins of each ``[MASK]``, the top ``top_k`` VQA answers). `pixel_bert.explore` sends it to
        the browser once, so that moving between words, layers and heads needs no second pass.

        A text longer than ``max_text_len`` is cut as everywhere else (start kept, closed with [SEP]);
        instead of a warning the cut WordPieces are returned in ``Inspection.cut_tokens``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        pixels, pixel_mask, sizes = self._images([image])
        limit = self.config.max_text_len
        full = self.tokenizer.encode(text, max_length=10 ** 9)
        cut = self.tokenizer.convert_ids_to_tokens(full[limit - 1: -1]) if len(full) > limit else []
        batch = self.tokenizer([text], max_length=limit)  # the same cut as _texts, without its warning
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        out = self.model.bert(ids, mask, pixels, pixel_mask, output_attentions=True)
        T, visual = out.text_len, out.visual
        gh, gw = visual.grid
        probs = torch.stack(out.attentions)[:, 0].float()               # (layers, heads, L, L)
        valid = visual.mask[0]                                          # (K,) visual tokens, True = real
        cells = visual.positions[0]                                     # grid cell of each visual token
        num_layers, num_heads = probs.shape[:2]
        # Back onto the grid (row-major gh x gw), padded cells exactly zero in both directions.
        text_to_pixels = probs.new_zeros(num_layers, num_heads, T, gh * gw)
        text_to_pixels[..., cells] = probs[:, :, :T, T:] * valid
        pixels_to_text = probs.new_zeros(num_layers, num_heads, gh * gw, T)
        pixels_to_text[:, :, cells] = probs[:, :, T:, :T] * valid[:, None]
        grid_valid = torch.zeros(gh * gw, dtype=torch.bool, device=valid.device)
        grid_valid[cells] = valid
        itm = fills = answers = None
        if hasattr(self.model, "itm"):
            itm = float(torch.sigmoid(self.model.itm(out.cls).float())[0])
        is_mask = ids[0] == self.tokenizer.mask_id
        if hasattr(self.model, "mlm") and bool(is_mask.any()):
            top = self.model.mlm(out.hidden[0, :T][is_mask]).float().softmax(-1)
            p, idx = top.topk(min(top_k, top.shape[-1]), dim=-1)
            fills = [(pos, [(self.tokenizer.vocab[i], q) for i, q in zip(ri, rp)])
                     for pos, ri, rp in zip(is_mask.nonzero()[:, 0].tolist(), idx.tolist(), p.tolist())]
        if hasattr(self.model, "vqa") and self.answers is not None:
            scores = torch.sigmoid(self.model.vqa(out.cls).float())[0]
            p, idx = scores.topk(min(top_k, scores.shape[-1]))
            answers = [(self.answers[i], q) for i, q in zip(idx.tolist(), p.tolist())]
        return Inspection(self.tokenizer.convert_ids_to_tokens(ids[0].tolist()), text_to_pixels.cpu(),
                          pixels_to_text.cpu(), grid_valid.cpu(), (gh, gw), sizes[0], self.config.feature_stride,
                          itm, fills, answers, cut, len(full))


@dataclass
class Inspection:
    """Everything one forward pass says about one (image, text) pair (`PixelBertPredictor.inspect`).

    tokens: the T WordPieces the model read, [CLS] and [SEP] included;
    text_to_pixels: (layers, heads, T, gh*gw) raw attention probabilities from each text token to
        each feature cell (row-major grid; the full joint softmax, so a row sums to the token's share
        of attention on pixels); pixels_to_text: (layers, heads, gh*gw, T) from each cell to each
        text token (pixel-to-text attention); both are zero on padded cells;
    valid: (gh*gw,) True on cells that hold image, False on padding;
    grid, image_size (width, height after the resize), stride: as in `AttentionMaps`;
    itm: the ITM probability (pre-training checkpoints), else None;
    fill_mask: [(position, [(word, p), ...]), ...] per [MASK] in order (MLM head), else None;
    answers: [(answer, p), ...] (VQA checkpoints), else None;
    cut_tokens: the WordPieces lost to truncation (empty when the text fit); full_length: the
        text's length in tokens before the cut ([CLS] and [SEP] included).
    """
    tokens: List[str]
    text_to_pixels: torch.Tensor
    pixels_to_text: torch.Tensor
    valid: torch.Tensor
    grid: Tuple[int, int]
    image_size: Tuple[int, int]
    stride: int
    itm: Optional[float]
    fill_mask: Optional[List[Tuple[int, List[Tuple[str, float]]]]]
    answers: Optional[List[Tuple[str, float]]]
    cut_tokens: List[str]
    full_length: int

    @property
    def extent(self) -> Tuple[int, int]:
        """(width, height) in resized-image pixels that the feature grid covers (>= image_size)."""
        return self.grid[1] * self.stride, self.grid[0] * self.stride

    def maps(self, layer: int, head: Optional[int] = None, renormalize: bool = True) -> AttentionMaps:
        """The `AttentionMaps` that ``attention_maps(image, text, layer, head, renormalize)`` gives,
        cut out of this pass (heads averaged before renormalising, as there)."""
        probs = self.text_to_pixels[layer]
        probs = probs.mean(dim=0) if head is None else probs[head]
        mass = probs.sum(-1)
        if renormalize:
            probs = probs / mass.clamp_min(1e-12)[:, None]
        gh, gw = self.grid
        return AttentionMaps(self.tokens, probs.view(-1, gh, gw), mass, self.grid, self.image_size, self.stride,
                             layer % self.text_to_pixels.shape[0], head, renormalize)
