"""The run sequence train.py and finetune.py share: the run folder, the vocabulary, then set-up,
resume, fit, save and evaluate around the `pixel_bert.trainer.Trainer`.

    run_folder         the run folder, held by this run alone (`checkpoints.RunLock`), and the CPU threads
    tokenizer_for_run  the run's vocabulary (the --init checkpoint's, a file's, the synthetic world's, BERT's)
    fit_run            Trainer -> resume -> config.json -> fit (model.pt, model/) -> evaluate -> result.json
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

from . import synthetic
from .batches import epoch_batch_sampler
from .checkpoints import RunLock
from .distributed import DistInfo, broadcast_from_main, share_cpu_threads
from .errors import RunFolderError, UserError
from .files import make_output_folder, write_json
from .pretrained import resolve_bert
from .tokenizer import WordPieceTokenizer
from .trainer import Trainer


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
        raise UserError("no vocabulary: the --init checkpoint has none; give --vocab_file or --bert_weights")
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"the vocabulary ({tokenizer.vocab_size} entries) does not match vocab_size "
                         f"{config.vocab_size}; pass --vocab_size to match it")
    return tokenizer


class TrainingData(NamedTuple):
    """What a task gives the Trainer: its training set, how to batch it, its loss step
    (``step_fn(model, batch, step) -> {"loss": ...}``), aspect-ratio group ids or None, and what the
    saved model carries besides its weights (e.g. VQA's answer list)."""
    dataset: Any
    collate_fn: Callable
    step_fn: Callable
    groups: Optional[List[int]]
    extra: Dict[str, Any]



@contextlib.contextmanager
def run_folder(out_dir: str, info: DistInfo, log: Callable[[str], None] = print) -> Iterator[str]:
    """``with run_folder(out_dir, info) as out_dir:`` creates (or reuses) the run folder, holds it for
    this run alone while the block runs (one lock per run, taken by rank 0; a second run in the folder
    is refused on every rank) and shares this node's CPU cores between its processes."""
    make_output_folder(out_dir)
    share_cpu_threads(info)
    lock, refusal, note = RunLock(out_dir) if info.is_main else None, None, None
    if lock is not None:
        try:
            note = lock.acquire()
        except RunFolderError as e:
            refusal = str(e)
    refusal = broadcast_from_main(refusal, info)
    if refusal:
        raise RunFolderError(refusal)
    if note:
        log(f"run folder {out_dir}: {note}")
    try:
        yield out_dir
    finally:
        if lock is not None:
            lock.release()


def config_json(run_config: Dict[str, Any]) -> Dict[str, Any]:
    """What RUN/config.json shows of a run's configuration: the saved model's vocabulary and answer
    list by their sizes (both are in model.pt and model/)."""
    extra = run_config.get("model_extra", {})
    shown = {"vocab_size": len(extra["vocab"])} if "vocab" in extra else {}
    if "answers" in extra:
        shown["num_answers"] = len(extra["answers"])
    return {**run_config, "model_extra": shown}


def fit_run(model, train_cfg, out_dir: str, data: TrainingData, run_config: Dict[str, Any], info: DistInfo,
            resume: Optional[str], max_steps: Optional[int], evaluate: Callable[[Trainer], Dict[str, Any]],
            announce: Callable[[Trainer], None] = lambda trainer: None) -> Dict[str, Any]:
    """Train ``model`` on ``data`` with the Trainer (resumed from ``resume``: "auto", a path or None),
    then ``evaluate(trainer)``; RUN/config.json is written once the resume is accepted, RUN/result.json
    at the end. Returns the result: training time, steps, where it resumed from, and the evaluation."""
    make_batch_sampler = epoch_batch_sampler(data.dataset, train_cfg.batch_size, train_cfg.seed, info.world_size,
                                             info.rank, data.groups)
    trainer = Trainer(model, train_cfg, out_dir, data.dataset, data.collate_fn, make_batch_sampler, data.step_fn,
                      info, run_config)
    trainer.resume(resume)
    if info.is_main:  # only once the resume is accepted: a refused resume leaves the run's files alone
        write_json(os.path.join(out_dir, "config.json"), config_json(run_config))
    announce(trainer)
    started, start_step = time.time(), trainer.step
    trainer.fit(max_steps=max_steps)
    result = {"task": run_config.get("task", "pretrain"), "train_seconds": time.time() - started,
              "steps": trainer.step, "steps_this_run": trainer.step - start_step, "resumed_from": trainer.resumed_from}
    result.update(evaluate(trainer))
    if info.is_main:
        write_json(os.path.join(out_dir, "result.json"), result)
    return result
