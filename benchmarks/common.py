"""Shared helpers of the benchmarks: timing (warm-up, then the median of N runs, with the GPU
synchronised around each), a large matmul's FLOP/s measured in the same process, FLOP counting,
peak memory, the device's nominal peak, a plain-text table and the JSON file every script writes.

Benchmarks print figures and assert nothing about time: a shared or throttled machine changes the
absolute numbers, so each script reports ratios measured in the same run next to them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler: no start/stop chatter on stderr

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from the vendors' data sheets. Matched by
# substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" precedes "H100").
GPU_PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),      # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),                      # SXM2; no bf16
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


def add_common_args(parser, repeat: Optional[int] = 5, warmup: int = 1, warmup_help: Optional[str] = None):
    """--device, --threads, --warmup, --repeat (unless ``repeat`` is None) and --json."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else torch's default)")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=warmup_help or f"untimed runs before timing (default {warmup})")
    if repeat is not None:
        parser.add_argument("--repeat", type=int, default=repeat, help=f"timed runs; the median is reported "
                            f"(default {repeat})")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


def setup(args) -> torch.device:
    """The device the flags ask for, with the thread count set and a fixed seed."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if name == "auto":
        name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 5) -> Dict:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeat`` timed ones, each timed on
    its own between device synchronisations. Returns dict(median, min, times)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeat, 1)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "times": times}


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
                     repeat: int = 5) -> Dict[str, float]:
    """Median seconds per call of each of ``fns``, timed in turns (a, b, c, a, b, c, ...) so that a
    change in the machine's load during the measurement affects all of them alike: ratios between
    them stay fair on a shared machine."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(max(repeat, 1)):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def square_matmul(device: torch.device, dtype: torch.dtype, n: Optional[int] = None):
    """(fn, flops): one large square matmul (2 n^3 FLOPs), the practical peak that the models'
    FLOP/s are compared against (time it in the same process, ideally in turns with the model)."""
    n = n or (8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 1024)  # CPU bf16 can be slow
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n ** 3


def matmul_flops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, repeat: int = 5) -> float:
    """FLOP/s of `square_matmul` on ``device``, measured now."""
    fn, flops = square_matmul(device, dtype, n)
    return flops / time_runs(fn, device, warmup=2, repeat=repeat)["median"]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention run by ``fn`` (forward and any backward it
    calls), counted by torch's FlopCounterMode. Attention runs the math SDPA backend while counting,
    so that every device counts it (CPU's fused kernel has no FLOP formula) and nothing recomputed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes while ``fn`` runs once. CUDA: max_memory_allocated (everything held: weights,
    optimizer state, activations). CPU: the peak growth of memory allocated by torch during the call
    (activations, gradients, temporaries; not what existed before it), from the allocation events of
    torch.profiler, which slows the call: never time the same call."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def operator_kind(name: str) -> str:
    """conv, attention, matmul or other, from a profiler event's name."""
    if "conv" in name and "convert" not in name:  # aten::convolution*, mkldnn/cudnn/_slow_conv2d kernels
        return "conv"
    if "attention" in name:  # aten::_scaled_dot_product_*_attention* and their backward
        return "attention"
    return "matmul" if name in MATMUL_OPS else "other"


def operators_by_section(run_sections: Callable, device: torch.device, exclude: Sequence[str] = (),
                         within: Sequence[str] = ()) -> Dict:
    """Profile ``run_sections(marked)``, which runs each part of a step as ``marked(name, fn)``, and
    sum the operators' self time by section and kind (conv, matmul, attention, other) as shares of
    the total without the ``exclude`` sections. On CPU every event's self CPU time counts (Python
    and autograd overhead are 'other'); on GPU the device time of the kernels each operator
    launched itself. An operator belongs to the section in which it started. Also returns the share
    of 'other' time outside the ``within`` sections (e.g. outside the CNN: time in neither the CNN
    nor attention nor matmuls)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    def marked(name, fn):
        with record_function(f"section:{name}"):
            out = fn()
            sync(device)
        return out
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_sections(marked)
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    spans = [(e.time_range.start, e.time_range.end, e.name[len("section:"):]) for e in events
             if e.name.startswith("section:")]
    table: Dict[str, Dict[str, float]] = {}
    for e in events:
        section = next((k for start, end, k in spans if start <= e.time_range.start <= end), None)
        if section is None or section in exclude:
            continue
        kinds = table.setdefault(section, dict.fromkeys(("conv", "matmul", "attention", "other"), 0.0))
        kinds[operator_kind(e.name)] += e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
    total = sum(t for kinds in table.values() for t in kinds.values()) or 1.0
    shares = {k: {kind: t / total for kind, t in kinds.items()} for k, kinds in table.items()}
    outside = sum(kinds["other"] for k, kinds in shares.items() if k not in within)
    return {"shares": shares, "outside_cnn_attention_matmul": outside}


def device_peak_tflops(device: torch.device, dtype: str) -> Dict:
    """The nominal dense peak of this GPU for ``dtype`` (fp32/bf16/fp16): dict(name, matched, tflops);
    tflops None when the card is not in GPU_PEAK_TFLOPS or on CPU."""
    if device.type != "cuda":
        return {"name": platform.processor() or "cpu", "matched": None, "tflops": None}
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return {"name": name, "matched": key, "tflops": peaks.get(dtype)}
    return {"name": name, "matched": None, "tflops": None}


def machine(device: torch.device) -> Dict:
    """What the figures were measured on (written into every JSON)."""
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def autocast(device: torch.device, dtype: str):
    """Mixed precision as training uses it (fp32 weights, bf16/fp16 compute); nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def print_table(rows: Sequence[Dict], columns: Sequence[str], title: str = ""):
    """Rows of dicts as an aligned text table; floats with 3 significant figures."""
    def fmt(v):
        if v == "":
            return ""
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "n/a" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: Optional[str], payload: Dict):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def csv_list(text: str, kind=str) -> List:
    """"100,all" -> ["100", "all"]; with kind=int, "600,800" -> [600, 800]."""
    return [kind(x) for x in text.split(",") if x.strip()]


def write_photos(folder: str, sizes: Sequence, seed: int = 0, quality: int = 90) -> List[str]:
    """One JPEG per (width, height) in ``sizes``, photo-like: smooth colour fields from an upsampled
    random grid plus mild sensor-like noise, so that decoding does realistic work (pure noise
    compresses far worse than photos, flat colour far better). Files already there are kept (they
    depend only on index, size and seed). Returns the paths."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = os.path.join(folder, f"photo_{i:05d}_{w}x{h}_{seed}.jpg")
        paths.append(path)
        if os.path.isfile(path):
            continue
        field = np.zeros((h, w, 3), dtype=np.float32)
        for cells, weight in ((6, 1.0), (60, 0.3)):  # large areas, then texture
            grid = Image.fromarray(rng.integers(0, 256, (cells, cells * 4 // 3, 3), dtype=np.uint8))
            field += weight * np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        pixels = np.clip(field / 1.3 + rng.normal(0, 9, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=quality)
    return paths


def random_captions(count: int, min_words: int, max_words: int, seed: int = 0) -> List[str]:
    """``count`` captions of min..max words of the synthetic vocabulary (one token per word)."""
    import numpy as np
    from pixel_bert.synthetic import SYNTHETIC_WORDS
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(SYNTHETIC_WORDS, rng.integers(min_words, max_words + 1))) for _ in range(count)]
