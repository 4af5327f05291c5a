"""Progress lines with throughput and ETA, and the metrics files of a run."""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections import deque
from typing import Optional

from .distributed import DistInfo
from .files import atomic_write


def format_seconds(s: float) -> str:
    return str(datetime.timedelta(seconds=int(max(s, 0))))


class SmoothedValue:
    """A window average for progress lines, plus the global average for epoch summaries."""

    def __init__(self, window: int = 20):
        self.window = deque(maxlen=window)
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1):
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.window) / max(len(self.window), 1)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricsWriter:
    """JSON lines in the run folder, plus TensorBoard when it is installed (main process only). The
    files are opened at the first record, so a run that has written nothing has left nothing yet."""

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled, self.out_dir = enabled, out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.file, self.tb = None, None

    def _open(self):
        self.file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
        except Exception:  # tensorboard not installed: the JSON lines are enough
            self.tb = None

    def cut_after(self, step: int):
        """Drop the records written after optimizer step ``step`` (a resumed run redoes those steps,
        so every step appears once in metrics.jsonl)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        self.close()
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_write(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, record: dict):
        if not self.enabled:
            return
        if self.file is None:
            self._open()
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record.get("step", 0))

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        self.file, self.tb = None, None


class RateClock:
    """Work done per second since the clock started and the time the rest takes at that rate: the
    throughput and ETA of every progress line (optimizer steps, evaluated items, downloaded bytes).
    ``done`` is what was already done when the clock started (a resumed run): only work done since
    counts in the rate, and only what is left counts in the ETA."""

    def __init__(self, total: Optional[float], done: float = 0):
        self.total, self.start_done, self.start = total, done, time.time()

    def rate(self, done: float) -> float:
        return (done - self.start_done) / max(time.time() - self.start, 1e-9)

    def eta(self, done: float) -> str:
        """The time left as h:mm:ss ("?" while nothing has been done since the start)."""
        if self.total is not None and done >= self.total:
            return format_seconds(0)
        rate = self.rate(done)
        return format_seconds((self.total - done) / rate) if rate > 0 and self.total is not None else "?"


class Progress:
    """A progress line every ``every`` seconds: done/total, rate in ``unit``/s and ETA. Only the
    main rank prints; with sharding each rank reports its own share, so rank 0's line is
    representative (all shards are the same size up to one item). ``done``: work already done
    before (a resumed evaluation), which the rate and the ETA leave out."""

    def __init__(self, total: int, unit: str, info: DistInfo, every: float = 10.0, label: str = "",
                 stream=None, done: int = 0):
        self.total, self.unit, self.every, self.label = total, unit, every, label
        self.enabled = info.is_main
        self.stream = stream or sys.stdout
        self.clock = RateClock(total, done)
        self.last = self.clock.start
        self.done = done

    def update(self, n: int, force: bool = False):
        self.done += n
        now = time.time()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            print(f"{self.label}{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%)  "
                  f"{self.clock.rate(self.done):,.0f} {self.unit}/s  eta {self.clock.eta(self.done)}",
                  file=self.stream, flush=True)
