"""Mixed precision for training and inference [choice]: bf16 where the GPU has it natively, fp16
with loss scaling on older GPUs (the paper's V100s), fp32 on the CPU."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AmpSettings:
    dtype: Optional[torch.dtype]   # autocast dtype, None = fp32
    loss_scaling: bool             # fp16 needs a GradScaler; bf16 has fp32's range and does not
    reason: str                    # for the start-up line


def amp_settings(amp: str, device: torch.device) -> AmpSettings:
    """The precision ``amp`` (`pixel_bert.config.TrainConfig.amp`) asks for on ``device``. "auto": bf16 on GPUs with native bf16 (compute capability 8.0 and up: A100, H100, ...);
    fp16 with loss scaling on older ones (the paper's V100s: `torch.cuda.is_bf16_supported()` says
    True there, but bf16 is emulated and slow); fp32 on CPU [choice]."""
    mode, reason = amp, f"--amp {amp}"
    if mode == "auto":
        if device.type != "cuda":
            return AmpSettings(None, False, f"fp32: --amp auto on {device.type}")
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        native = major >= 8
        mode = "bf16" if native else "fp16"
        reason = (f"--amp auto on {name} (compute capability {major}.{minor}): "
                  + ("native bf16" if native else "no native bf16 below 8.0, so fp16 with loss scaling"))
    if mode == "none":
        return AmpSettings(None, False, f"fp32: {reason}")
    if mode == "fp16":
        return AmpSettings(torch.float16, True, f"fp16 + loss scaling: {reason}")
    return AmpSettings(torch.bfloat16, False, f"bf16: {reason}")


def eval_dtype(device: torch.device, amp: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype of inference: bf16 (or fp16) on CUDA, None on CPU (as in training)."""
    return amp_settings(amp, device).dtype


def eval_autocast(device: torch.device, amp: str = "auto"):
    """Autocast for inference (`eval_dtype`); nothing on CPU."""
    dtype = eval_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
