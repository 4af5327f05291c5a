"""Training-step throughput of PixelBert for a preset, SDPA vs the manual attention path, with and
without random pixel sampling. Prints figures; asserts nothing (benchmarks are not tests).

    python benchmarks/model_speed.py                       # tiny preset on CPU
    python benchmarks/model_speed.py --preset r50 --device cuda --batch 64 --amp bf16
"""
import argparse
import time

import torch

from pixel_bert.config import make_model_config
from pixel_bert.heads import PixelBertForPreTraining


def step_time(model, ids, mask, images, sample, steps, amp):
    ctx = torch.autocast(images.device.type, dtype=torch.bfloat16) if amp == "bf16" else torch.autocast(
        images.device.type, enabled=False)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with ctx:
            _, mlm, itm = model(ids, mask, images, num_sampled_pixels=sample)
            loss = mlm.float().logsumexp(-1).mean() + itm.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    if images.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset: tiny, r50, x152")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--text-len", type=int, default=24, help="tokens per caption")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--amp", default="none", help="none or bf16")
    args = p.parse_args()
    cfg = make_model_config(args.preset, backbone_weights=None, bert_weights=None)
    side = cfg.image_short_side
    ids = torch.randint(5, cfg.vocab_size, (args.batch, args.text_len), device=args.device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    images = torch.randn(args.batch, 3, side, side, device=args.device)
    print(f"preset {args.preset}: {side}x{side} images, batch {args.batch}, device {args.device}, amp {args.amp}")
    for impl in ("sdpa", "manual"):
        cfg.attention_impl = impl
        model = PixelBertForPreTraining(cfg).to(args.device).train()
        for sample in (0, cfg.num_sampled_pixels):
            t = step_time(model, ids, mask, images, sample, args.steps, args.amp)
            label = f"{sample} sampled pixels" if sample else "all pixels"
            print(f"  {impl:6s} {label:18s} {t * 1000:8.1f} ms/step  {args.batch / t:8.1f} images/s")


if __name__ == "__main__":
    main()
