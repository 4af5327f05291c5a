"""What train.py and finetune.py share around the Trainer: the run's vocabulary."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from . import synthetic
from .pretrained import resolve_bert
from .tokenizer import WordPieceTokenizer


def tokenizer_for_run(config, out_dir: str, synthetic_data: bool, vocab: Optional[Sequence[str]] = None
                      ) -> WordPieceTokenizer:
    """The vocabulary of a training run (train.py, finetune.py), kept as ``out_dir/vocab.txt`` when
    it is written there: ``vocab`` (the token list an ``--init`` checkpoint carries), else
    ``config.vocab_file``, else the synthetic world's for synthetic data, else the vocab.txt of the
    BERT checkpoint ``config.bert_weights``. Its size must equal ``config.vocab_size``."""
    path = os.path.join(out_dir, "vocab.txt")
    if vocab:
        tokenizer = WordPieceTokenizer.from_tokens(vocab, path)
    elif config.vocab_file:
        tokenizer = WordPieceTokenizer(config.vocab_file)
    elif synthetic_data:
        tokenizer = WordPieceTokenizer(synthetic.write_vocab(path, pad_to=config.vocab_size))
    elif config.bert_weights:
        tokenizer = WordPieceTokenizer(os.path.join(resolve_bert(config.bert_weights), "vocab.txt"))
    else:
        raise ValueError("no vocabulary: the --init checkpoint has none; give --vocab_file or --bert_weights")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the vocabulary ({tokenizer.vocab_size} entries) does not match vocab_size "
                         f"{config.vocab_size}; pass --vocab_size to match it")
    return tokenizer
