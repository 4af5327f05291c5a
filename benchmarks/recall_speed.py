"""Time of R@1/5/10 in both directions on a COCO 5K-sized score matrix (5,000 images x 25,000 captions).

    python benchmarks/recall_speed.py [--repeat 3] [--threads 2]

Prints the median seconds of `pixel_bert.metrics.retrieval_recall` over ``--repeat`` runs and the
COCO 1K five-fold protocol on the same matrix. Asserts nothing about time.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pixel_bert.metrics import coco_1k_recall, retrieval_recall  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the median is printed (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5000, 25000, generator=g)
    caption_image = torch.arange(25000) // 5
    scores[caption_image, torch.arange(25000)] += 0.999  # true pairs mostly on top
    for name, fn in [("5K recall", lambda: retrieval_recall(scores, caption_image)),
                     ("1K folds", lambda: coco_1k_recall(scores, caption_image))]:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name}: median {sorted(times)[len(times) // 2]:.2f} s over {args.repeat} runs "
              f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
