"""Pre-train Pixel-BERT with MLM (eq. (7)) and ITM (eq. (8)): `python train.py` runs the CPU demo,
`torchrun ... train.py --config pretrain-r50 ...` the paper's recipe; `--help` explains every flag.

The script lives in the package, `pixel_bert/train.py` (also `python -m pixel_bert.train` and
`pixel-bert-train` once installed); this file keeps `torchrun train.py` working from a checkout.
"""
from pixel_bert.train import cli, main  # noqa: F401 (main: for `import train; train.main([...])`)

if __name__ == "__main__":
    cli()
