"""Convert a pixel-bert model.pt into a model folder, the layout models are shared in, which loads
without unpickling anything.

    python -m pixel_bert.export runs/ft-vqa/model.pt exported/ft-vqa
    python -m pixel_bert.export runs/demo/model.pt exported/demo --force    # replace an earlier export

The folder (written by pixel_bert.saved_model.write_model_folder, atomically: it appears whole or not
at all)::

    config.json         "format": "pixel-bert", the task, the model config, the preprocessing
                        (image sizes, image_format, image_mean / image_std, max_text_len), the tied
                        weights and the list of files
    model.safetensors   every tensor once: the MLM decoder, tied to the word embeddings, is stored
                        as the embedding table and tied again on load
    vocab.txt           the WordPiece vocabulary, one token a line (id = line number)
    answers.json        VQA only: the answer strings, in the order of the head's outputs

train.py and finetune.py write this folder themselves next to model.pt (RUN/model/); this command
converts a model.pt written before that, or by hand. Every script that takes a checkpoint takes the
folder as well: finetune.py --init, train.py --init, evaluate.py --checkpoint,
python -m pixel_bert.visualize --checkpoint, and PixelBertPredictor.from_pretrained(folder).
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

from .cli import add_debug_argument, run_cli
from .saved_model import (FOLDER_ANSWERS, FOLDER_CONFIG, FOLDER_VOCAB, FOLDER_WEIGHTS, read_checkpoint,
                          read_folder_config, write_model_folder)

FOLDER_FILES = (FOLDER_CONFIG, FOLDER_WEIGHTS, FOLDER_VOCAB, FOLDER_ANSWERS)
CARRIED_KEYS = ("model", "model_config", "task", "vocab", "answers")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixel_bert.export", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the model.pt to convert (of train.py, finetune.py or "
                   "pixel_bert.saved_model.save_model); a model folder is accepted too, and is checked and copied")
    p.add_argument("out", help="the model folder to write; it must not exist or be empty, unless --force")
    p.add_argument("--force", action="store_true", help="replace OUT when it holds an earlier export (only "
                   f"{', '.join(FOLDER_FILES)}); a folder holding any other file is never replaced")
    add_debug_argument(p)
    return p


def check_output_folder(out: str, force: bool):
    """OUT must be new or empty; with --force it may also hold an earlier export, and nothing else."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise SystemExit(f"error: {out} exists and is not a folder; give a folder to write the model into")
    present = sorted(os.listdir(out))
    if not present:
        return
    if not force:
        raise SystemExit(f"error: {out} is not empty ({', '.join(present[:5])}{' ...' if len(present) > 5 else ''}); "
                         "give a new folder, or --force to replace an earlier export there")
    foreign = [name for name in present if name not in FOLDER_FILES]
    if foreign:
        raise SystemExit(f"error: {out} holds files that are not a model folder's ({', '.join(foreign[:5])}); "
                         "--force replaces only an earlier export, so give another folder")


def human_size(n: int) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
    value, unit = float(n), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def describe(source: str, out: str, ckpt: dict, sizes: Dict[str, int]) -> List[str]:
    """The lines printed after an export: the files with their sizes, what the weights hold."""
    tied = read_folder_config(out)["tied_weights"]
    stored = [t for name, t in ckpt["model"].items() if name not in tied]
    width = max(len(name) for name in sizes)
    lines = [f"wrote {out}: task {ckpt.get('task', 'pretrain')!r}, {len(stored)} tensors, "
             f"{sum(t.numel() for t in stored):,} values"
             + (f" ({', '.join(f'{a} tied to {b}' for a, b in tied.items())}: stored once)" if tied else "")]
    lines += [f"  {name:<{width}}  {human_size(size):>9}" for name, size in sizes.items()]
    lines.append(f"  {'total':<{width}}  {human_size(sum(sizes.values())):>9}"
                 + (f"   (from {source}: {human_size(os.path.getsize(source))})" if os.path.isfile(source) else ""))
    dropped = sorted(set(ckpt) - set(CARRIED_KEYS))
    if dropped:
        lines.append(f"  not carried over (not part of a model): {', '.join(dropped)}")
    return lines


def main(argv: Optional[List[str]] = None) -> Dict[str, int]:
    """Convert; returns {file name: size in bytes} of the folder written."""
    args = get_args_parser().parse_args(argv)
    check_output_folder(args.out, args.force)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        sizes = write_model_folder(ckpt, args.out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    print("\n".join(describe(args.checkpoint, args.out, ckpt, sizes)))
    return sizes


def cli():
    """The command-line entry point (pixel-bert-export, python -m pixel_bert.export)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
