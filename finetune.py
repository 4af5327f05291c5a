"""Fine-tune Pixel-BERT on VQA 2.0, NLVR2 or image-text retrieval: `python finetune.py --task vqa ...`;
`--help` explains every flag.

The script lives in the package, `pixel_bert/finetune.py` (also `python -m pixel_bert.finetune` and
`pixel-bert-finetune` once installed); this file keeps `torchrun finetune.py` working from a checkout.
"""
from pixel_bert.finetune import cli, main  # noqa: F401 (main: for `import finetune; finetune.main([...])`)

if __name__ == "__main__":
    cli()
