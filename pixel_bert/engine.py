"""Training machinery shared by train.py and finetune.py: distributed set-up, the paper's two
optimisers and schedule (PAPER.md section 2 "Optimisation"), mixed precision, gradient
accumulation, atomic checkpoints with exact resume, and progress logging.

The loop is task-agnostic: ``Trainer.fit`` calls ``step_fn(model, batch) -> {"loss": ..., other
scalars}`` per micro-batch. Pre-training and every fine-tuning task plug in their own step_fn.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import random
import re
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import TrainConfig

# -------------------------------------------------------------------------------------------------
#                                        Distributed
# -------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (NCCL on GPU, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
    else:
        rank, world, local_rank = 0, 1, 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev)


def cleanup_distributed():
    """Leave the process group together: a rank that tears gloo down while another still writes its
    files can abort the other's connection (seen as SIGABRT at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def share_cpu_threads(info: "DistInfo") -> None:
    """On CPU, split the cores between the processes of this node, unless OMP_NUM_THREADS says how
    many threads each should use. (Oversubscribed cores are far slower than idle ones: two threads
    per process on a busy 2-core machine measured about 15x slower than one.)"""
    if info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@contextlib.contextmanager
def distributed(device: str = "auto"):
    """``with distributed(args.device) as info:`` joins the torchrun process group (if any) and
    leaves it together with the other ranks on the way out: the one set-up/tear-down of every script.

    A rank that fails leaves at once, without the closing barrier: the other ranks may be blocked
    in another collective (a DDP broadcast, a gradient all-reduce), and a barrier there would hang
    the whole job instead of failing it. Its non-zero exit makes torchrun stop the others."""
    info = setup_distributed(device)
    yield info  # an error in the body propagates from here, skipping the closing barrier below
    cleanup_distributed()


def exit_after_distributed_run():
    """End a torchrun worker once its work is done and its files are written. torch's gloo backend
    can abort at interpreter shutdown after a clean run ("terminate called without an active
    exception", seen in about a third of 2-process CPU runs with torch 2.14), so a worker of a
    multi-process run leaves without the C++ destructors. A single process exits normally."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def all_reduce_mean(values: Dict[str, float], info: DistInfo) -> Dict[str, float]:
    if info.world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: v / info.world_size for k, v in zip(keys, t.tolist())}


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


# -------------------------------------------------------------------------------------------------
#                                  Optimisers and schedule
# -------------------------------------------------------------------------------------------------


def is_cnn_parameter(name: str) -> bool:
    return ".visual_embedding.backbone." in f".{name}"


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> List[torch.optim.Optimizer]:
    """SGD for the CNN, AdamW for the transformer and heads [paper]. Biases and LayerNorm weights
    get no weight decay (BERT practice) [choice]. A frozen CNN gets no optimiser at all."""
    cnn, decay, no_decay = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if is_cnn_parameter(name):
            cnn.append(p)
        elif p.ndim < 2 or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    optimizers = [torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}],
                                    lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)]
    if cnn:
        optimizers.append(torch.optim.SGD(cnn, lr=cfg.cnn_lr, momentum=cfg.cnn_momentum,
                                          weight_decay=cfg.cnn_weight_decay))
    return optimizers


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up from
    ``warmup_start_factor`` over ``warmup_steps``, then x``decay_factor`` at each decay epoch.
    Counted in optimizer steps, so gradient accumulation never shrinks the schedule."""
    warm = 1.0
    if step < cfg.warmup_steps:
        warm = cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / cfg.warmup_steps
    epoch = step / max(steps_per_epoch, 1)
    return warm * cfg.decay_factor ** sum(epoch >= e for e in cfg.decay_epochs)


def amp_settings(cfg: TrainConfig, device: torch.device):
    """(autocast dtype or None, use GradScaler): bf16 where supported, fp16 + loss scaling on older
    GPUs, fp32 on CPU with "auto" [choice]."""
    mode = cfg.amp
    if mode == "auto":
        if device.type != "cuda":
            return None, False
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "none":
        return None, False
    if mode == "fp16":
        return torch.float16, device.type == "cuda"
    return torch.bfloat16, False


# -------------------------------------------------------------------------------------------------
#                                         Checkpoints
# -------------------------------------------------------------------------------------------------

CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt$")


def atomic_save(obj, path: str):
    """Write to a temporary file, flush to disk, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(out_dir: str) -> List[str]:
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if CKPT_PATTERN.search(p)]
    return sorted(paths, key=lambda p: int(CKPT_PATTERN.search(p).group(1)))


def newest_valid_checkpoint(out_dir: str) -> Optional[str]:
    """The newest checkpoint that loads; a damaged one is reported and passed over."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as e:
            print(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", file=sys.stderr)
    return None


def rng_state() -> dict:
    """Every random stream of this process, as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """weights_only loading returns tuples as lists in places; random/numpy want tuples back."""
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


# -------------------------------------------------------------------------------------------------
#                                          Logging
# -------------------------------------------------------------------------------------------------


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
    """JSON lines in the run folder, plus TensorBoard when it is installed (main process only)."""

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except Exception:  # tensorboard not installed: the JSON lines are enough
            self.tb = None

    def write(self, record: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record.get("step", 0))

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def format_seconds(s: float) -> str:
    return str(datetime.timedelta(seconds=int(max(s, 0))))


# -------------------------------------------------------------------------------------------------
#                                          Trainer
# -------------------------------------------------------------------------------------------------


class SkipBatchSampler:
    """Yields the batches of ``batch_sampler`` after the first ``skip`` (index lists only, no data
    is loaded), so a resumed run continues at its exact position inside the epoch."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self):
        return max(len(self.batch_sampler) - self.skip, 0)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Runs ``cfg.epochs`` epochs of ``step_fn`` over ``dataset`` with DDP, AMP, accumulation,
    checkpoints every ``cfg.ckpt_every`` optimizer steps and at each epoch end, and exact resume.

    make_batch_sampler(epoch) -> an iterable of index lists for this rank (the same count on every
    rank); step_fn(model, batch) -> dict of scalar tensors with "loss".
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, out_dir: str, dataset, collate_fn,
                 make_batch_sampler: Callable[[int], Iterable], step_fn: Callable, info: DistInfo,
                 run_config: dict, log: Callable[[str], None] = print, on_epoch_end: Optional[Callable] = None):
        self.cfg, self.out_dir, self.info = cfg, out_dir, info
        self.dataset, self.collate_fn, self.make_batch_sampler = dataset, collate_fn, make_batch_sampler
        self.step_fn, self.run_config, self.on_epoch_end = step_fn, run_config, on_epoch_end
        self.log = log if info.is_main else (lambda *_: None)
        os.makedirs(out_dir, exist_ok=True)
        if cfg.freeze_backbone:
            for name, p in model.named_parameters():
                if is_cnn_parameter(name):
                    p.requires_grad_(False)
        model.to(info.device)
        self.model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if info.world_size > 1 else model
        self.optimizers = build_optimizers(unwrap(self.model), cfg)
        self.steps_per_epoch = len(make_batch_sampler(0)) // cfg.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset gives fewer than {cfg.grad_accum_steps} batches of {cfg.batch_size} "
                             f"per process: lower --batch_size or --grad_accum_steps, or add data")
        factor = lambda step: lr_factor(step, self.steps_per_epoch, cfg)  # noqa: E731
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]
        self.amp_dtype, use_scaler = amp_settings(cfg, info.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.resumed_from: Optional[str] = None
        self.writer = MetricsWriter(out_dir, info.is_main)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rngs = [rng_state()]
        if self.info.world_size > 1:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng_state())
        model = unwrap(self.model)
        from .config import config_to_dict
        return {"model": model.state_dict(), "model_config": config_to_dict(model.config),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "rng": rngs, "world_size": self.info.world_size,
                "run_config": self.run_config}

    def save_checkpoint(self):
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        if self.info.is_main:
            path = os.path.join(self.out_dir, f"ckpt_{self.step:08d}.pt")
            atomic_save(state, path)
            for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
                os.remove(old)
        if self.info.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, path: str):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        unwrap(self.model).load_state_dict(ckpt["model"])
        for o, s in zip(self.optimizers, ckpt["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, ckpt["schedulers"]):
            sch.load_state_dict(s)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        rngs = ckpt["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            self.log(f"note: checkpoint was written by {len(rngs)} processes, resuming on "
                     f"{self.info.world_size}: random streams restart from rank 0's state")
            set_rng_state(rngs[0])
        self.log(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    def resume(self, spec: Optional[str]):
        """``spec`` "auto" takes the newest valid checkpoint in the run folder (none: start fresh)."""
        if not spec:
            return
        path = newest_valid_checkpoint(self.out_dir) if spec == "auto" else spec
        if path is None:
            self.log(f"no checkpoint in {self.out_dir}: starting from scratch")
            return
        self.load_checkpoint(path)
        self.resumed_from = path

    # ---- the loop ---------------------------------------------------------------------------------
    def _loader(self, epoch: int, skip_batches: int):
        batches = SkipBatchSampler(self.make_batch_sampler(epoch), skip_batches)
        # the loader's own generator keeps worker seeding off the global RNG (exact resume)
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=self.cfg.num_workers,
            pin_memory=self.info.device.type == "cuda", generator=g,
            persistent_workers=False, prefetch_factor=4 if self.cfg.num_workers else None)

    def replicas_in_sync(self) -> bool:
        """True when every rank holds bit-identical parameters (DDP's promise, checked: one float64
        checksum per parameter, gathered from all ranks). BatchNorm running statistics are not
        compared: DDP copies rank 0's buffers at the start of each forward, and rank 0 saves them."""
        sums = torch.stack([p.detach().double().sum() for p in unwrap(self.model).parameters()]).to(self.info.device)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return torch.equal(low, high)

    def _zero_loss(self) -> torch.Tensor:
        """A loss of 0 connected to every trainable parameter, so DDP's all-reduce still happens."""
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def fit(self, max_steps: Optional[int] = None):
        cfg, info = self.cfg, self.info
        usable = self.steps_per_epoch * cfg.grad_accum_steps  # micro-batches per epoch that end a step
        total_steps = self.steps_per_epoch * cfg.epochs
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)
        self.log(f"training {total_steps} optimizer steps: {cfg.epochs} epochs x {self.steps_per_epoch} steps, "
                 f"{cfg.batch_size} per process x {cfg.grad_accum_steps} accumulation x {info.world_size} "
                 f"processes = {cfg.batch_size * cfg.grad_accum_steps * info.world_size} samples per step")
        bad_streak = 0
        start_time, start_step = time.time(), self.step
        while self.epoch < cfg.epochs and self.step < total_steps:
            meters = defaultdict(SmoothedValue)
            pending = defaultdict(list)  # per-step scalars not yet copied to the host
            bad_samples = 0
            skip = self.batch_in_epoch
            loader = self._loader(self.epoch, skip)
            self.model.train()
            t_data = time.time()
            window_finite = torch.ones((), dtype=torch.bool, device=info.device)
            for batch in loader:
                data_time = time.time() - t_data
                bad_samples += int(batch.get("num_bad", 0)) if isinstance(batch, dict) else 0
                update = (self.batch_in_epoch + 1) % cfg.grad_accum_steps == 0
                sync = contextlib.nullcontext() if update or not isinstance(self.model, DDP) else self.model.no_sync()
                with sync:
                    with self._autocast():
                        if isinstance(batch, dict) and "input_ids" in batch and len(batch["input_ids"]) == 0:
                            out = {"loss": self._zero_loss()}  # every sample was bad: keep ranks in step
                        else:
                            out = self.step_fn(self.model, batch)
                    loss = out["loss"]
                    self.scaler.scale(loss / cfg.grad_accum_steps).backward()
                window_finite &= torch.isfinite(loss.detach()).all()
                self.batch_in_epoch += 1
                for k, v in out.items():  # kept on the device: no GPU sync per step
                    pending[k].append(v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v)))
                meters["data_time"].update(data_time)
                if not update:
                    t_data = time.time()
                    continue
                finite, window_finite = window_finite.float(), torch.ones_like(window_finite)
                if info.world_size > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    bad_streak += 1
                    for o in self.optimizers:
                        o.zero_grad(set_to_none=True)
                    self.log(f"warning: non-finite loss at step {self.step} ({bad_streak} in a row); step skipped")
                    if bad_streak > cfg.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{bad_streak} consecutive non-finite losses at step {self.step}: stopping. The last "
                            f"good checkpoint is in {self.out_dir}; lower the lr, use --amp bf16/none, or check "
                            "the data.")
                    t_data = time.time()
                    continue
                bad_streak = 0
                for o in self.optimizers:
                    self.scaler.unscale_(o)
                params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                for o in self.optimizers:
                    self.scaler.step(o)
                self.scaler.update()
                for o in self.optimizers:
                    o.zero_grad(set_to_none=True)
                for s in self.schedulers:
                    s.step()
                self.step += 1
                pending["grad_norm"].append(grad_norm.detach().float())
                if self.step % cfg.log_every == 0 or self.step == total_steps:
                    self._flush(pending, meters)
                    self._log_progress(meters, total_steps, start_time, start_step)
                if self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                if self.step >= total_steps or self.batch_in_epoch >= usable:
                    break  # leftover micro-batches that cannot complete a step are not run
                t_data = time.time()
            epoch_done = self.batch_in_epoch >= usable
            self._flush(pending, meters)
            summary = {k: m.global_avg for k, m in meters.items()}
            summary = all_reduce_mean(summary, info)
            bad_total = all_reduce_mean({"bad": float(bad_samples)}, info)["bad"] * info.world_size
            if epoch_done:
                self.epoch += 1
                self.batch_in_epoch = 0
            self.log(f"epoch {self.epoch - int(epoch_done)} {'done' if epoch_done else 'stopped'}: " +
                     "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k != "data_time") +
                     f"  bad samples skipped {int(bad_total)}")
            self.writer.write({"kind": "epoch", "epoch": self.epoch, "step": self.step, **summary,
                               "bad_samples": int(bad_total)})
            if epoch_done and self.on_epoch_end is not None:
                self.on_epoch_end(self)
            self.save_checkpoint()
        if info.world_size > 1:
            self.log(f"weights identical on all {info.world_size} ranks: {self.replicas_in_sync()}")
        if info.is_main:  # the trained weights alone, for finetune.py / evaluate.py / inference
            from .weights import save_model
            save_model(unwrap(self.model), os.path.join(self.out_dir, "model.pt"),
                       extra={"task": self.run_config.get("task", "pretrain"),
                              **self.run_config.get("model_extra", {})})
        self.writer.close()
        return self

    @staticmethod
    def _flush(pending, meters):
        """Move the scalars gathered since the last log line to the meters: one host copy per key."""
        for k, values in pending.items():
            for v in torch.stack([t.to(values[0].device) for t in values]).tolist():
                meters[k].update(v)
        pending.clear()

    def _log_progress(self, meters, total_steps, start_time, start_step):
        cfg = self.cfg
        elapsed = time.time() - start_time
        done = self.step - start_step
        rate = done / max(elapsed, 1e-9)
        samples = rate * cfg.batch_size * cfg.grad_accum_steps * self.info.world_size
        eta = (total_steps - self.step) / max(rate, 1e-9)
        lrs = [g["lr"] for o in self.optimizers for g in o.param_groups[:1]]
        values = {k: m.avg for k, m in meters.items()}
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.info.device.type == "cuda" else 0.0
        parts = [f"epoch {self.epoch} step {self.step}/{total_steps}", f"eta {format_seconds(eta)}",
                 f"{samples:.1f} samples/s"]
        parts += [f"{k} {v:.4f}" for k, v in values.items() if k not in ("data_time", "grad_norm")]
        parts += [f"lr {' '.join(f'{lr:.2e}' for lr in lrs)}", f"data {values.get('data_time', 0):.3f}s"]
        if mem:
            parts.append(f"mem {mem:.1f}G")
        self.log("  ".join(parts))
        self.writer.write({"kind": "train", "epoch": self.epoch, "step": self.step, "samples_per_s": samples,
                           "lr": lrs[0], **values, "max_mem_gb": mem})
