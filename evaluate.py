"""Evaluate a fine-tuned Pixel-BERT, or score result files, with the official metrics:
`python evaluate.py --task vqa --checkpoint RUN/model.pt ...`; `--help` explains every flag.

The script lives in the package, `pixel_bert/evaluate.py` (also `python -m pixel_bert.evaluate` and
`pixel-bert-evaluate` once installed); this file keeps `torchrun evaluate.py` working from a checkout.
"""
from pixel_bert.evaluate import cli, main  # noqa: F401 (main: for `import evaluate; evaluate.main([...])`)

if __name__ == "__main__":
    cli()
