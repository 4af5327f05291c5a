"""WordPiece tokenisation for the language embedding (Sec. 3.2 of the paper, eq. 4).

Pixel-BERT reads text with BERT's WordPiece vocabulary (bert-base-uncased, 30,522 pieces) so that a
BERT checkpoint loads unchanged. This module wraps the `tokenizers` library's BERT WordPiece
pipeline (lowercasing, accent stripping, CJK splitting, punctuation splitting, greedy longest-match
WordPiece) and adds batch encoding into padded tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from tokenizers import BertWordPieceTokenizer

from .errors import UserError
from .files import write_text

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_vocab_file(tokens: Sequence[str], path: str) -> str:
    """Write a vocab.txt (one token a line, id = line number) atomically (`files.write_text`): every
    rank of a torchrun job writes the same vocabulary into the run folder, and a rank must never read
    another's half-written file (a short vocabulary = a wrong model)."""
    return write_text(path, "\n".join(tokens) + "\n")


def check_vocab(vocab: Sequence[str], source: str) -> None:
    """A vocabulary must list each token once (a repeated line would map one word to two ids, and the
    tokenizer keeps one of them) and start with no byte-order mark; the error names ``source``."""
    if vocab and vocab[0].startswith("\ufeff"):
        raise UserError(f"{source}: the vocabulary starts with a byte-order mark; save it as UTF-8 without BOM")
    first: Dict[str, int] = {}
    for line, token in enumerate(vocab, 1):
        if token in first:
            raise UserError(f"{source}: token {token!r} is listed twice (lines {first[token]} and {line}); each "
                            "token must appear once, its line number being its id")
        first[token] = line


@dataclass
class TextBatch:
    """Padded token ids and their mask, both (B, T). mask is True on real tokens."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class WordPieceTokenizer:
    """BERT's uncased WordPiece tokeniser built from a vocab.txt (one piece a line, id = line number).

    Encoding gives ``[CLS] w_1 .. w_n [SEP]`` (the text half of eq. 6), truncated to ``max_length``.
    The literal string "[MASK]" inside a text is kept as the mask token, as in BERT.
    """

    def __init__(self, vocab_file: str, lowercase: bool = True):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(
                f"vocab file not found: {vocab_file!r}. Pass the vocab.txt of a BERT checkpoint "
                "(e.g. bert-base-uncased/vocab.txt, see pixel_bert.pretrained.download_bert) or, for the "
                "synthetic demo, one written by pixel_bert.synthetic.write_vocab().")
        self.vocab_file = vocab_file
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = [line.rstrip("\n") for line in f]
        check_vocab(self.vocab, vocab_file)
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise UserError(f"vocab file {vocab_file!r} lacks the special tokens {missing}; "
                             f"a BERT vocabulary must contain all of {list(SPECIAL_TOKENS)}")
        self._tok = BertWordPieceTokenizer(vocab_file, lowercase=lowercase)
        self.pad_id = self._tok.token_to_id("[PAD]")
        self.unk_id = self._tok.token_to_id("[UNK]")
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")
        self.mask_id = self._tok.token_to_id("[MASK]")
        self.special_ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    @classmethod
    def from_tokens(cls, tokens: Sequence[str], path: str, lowercase: bool = True) -> "WordPieceTokenizer":
        """Write ``tokens`` (e.g. the ``vocab`` list stored in a pixel-bert checkpoint) as a vocab.txt
        at ``path`` and load it, so a checkpoint carries its own vocabulary."""
        return cls(write_vocab_file(tokens, path), lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_length: int = 512) -> List[int]:
        """Ids of ``[CLS] text [SEP]``, truncated so the whole fits in ``max_length``."""
        ids = self._tok.encode(text).ids
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.sep_id]
        return ids

    def tokenize(self, text: str) -> List[str]:
        """WordPiece strings of ``text`` without [CLS]/[SEP] (for display and attention labels)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.vocab[i] for i in ids]

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        return self.unk_id if i is None else i

    def __call__(self, texts: Sequence[str], max_length: int = 40) -> TextBatch:
        """Encode a batch, pad to the longest (capped at ``max_length``), return (B, T) tensors."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [e.ids for e in self._tok.encode_batch(list(texts))]
        encoded = [ids if len(ids) <= max_length else ids[: max_length - 1] + [self.sep_id]
                   for ids in encoded]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, ids in enumerate(encoded):  # one copy per sentence, not per token
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        return TextBatch(input_ids, mask)

