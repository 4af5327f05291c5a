"""The training loop shared by train.py and finetune.py: DDP, the paper's two optimisers and schedule
(`pixel_bert.optim`), mixed precision (`pixel_bert.precision`), gradient accumulation, atomic
checkpoints with exact resume (`pixel_bert.checkpoints`) and progress logging (`pixel_bert.progress`).

The loop is task-agnostic and reads top to bottom, as torchvision's ``train_one_epoch`` does::

    Trainer.fit               epochs until the step budget is spent, then the final model.pt and model/
      Trainer.train_one_epoch   this epoch's batches (a resumed run starts where its checkpoint stopped)
        Trainer.micro_batch       forward + backward of one batch under autocast
        Trainer.optimizer_step    one finiteness vote, unscale, clip, step both optimisers, schedule
        Trainer.after_step        progress line, periodic checkpoint
      Trainer.end_of_epoch      summary line, checkpoint

A task plugs in ``step_fn(model, batch, step) -> {"loss": tensor, other scalars}``; ``step`` is the
number of optimizer steps taken so far. Batches are dicts; the loop reads only their bookkeeping
keys ``num_samples`` (0 when every sample of the batch was bad) and ``num_bad`` / ``bad_samples``
(the `pixel_bert.bad_samples.BadSample` of each sample the collator dropped: warned about once per file per
run, and the first few named when too many are bad).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .bad_samples import BadDataError, BadSampleReporter, BadSampleTally
from .checkpoints import (batch_layout, check_plain_data, list_checkpoints, newest_valid_checkpoint,
                          read_training_checkpoint, remove_interrupted_checkpoint_writes, rng_state,
                          set_aside_previous_run, set_rng_state)
from .config import TrainConfig, config_to_dict
from .distributed import DistInfo, all_reduce_mean, unwrap
from .errors import RunFolderError, RunInterrupted, UserError
from .files import save_torch
from .optim import build_optimizers, lr_factor
from .precision import amp_settings
from .progress import MetricsWriter, RateClock, SmoothedValue
from .saved_model import save_model, save_model_folder


# Model config fields a run may change when it resumes: how the same network is computed or was
# first initialised, not what it is.
RESUMABLE_MODEL_FIELDS = ("backbone_weights", "bert_weights", "vocab_file", "gradient_checkpointing",
                          "backbone_checkpointing", "channels_last", "attention_impl", "image_jpeg_draft")


class EpochBatches:
    """The batch sampler of the current epoch, minus the batches a resumed run already did. One
    object for the whole run, so the DataLoader (and its persistent workers) is built once."""

    def __init__(self, make_batch_sampler: Callable[[int], Iterable]):
        self.make_batch_sampler = make_batch_sampler
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        for i, batch in enumerate(self.make_batch_sampler(self.epoch)):
            if i >= self.skip:  # index lists only: skipped batches load no data
                yield batch

    def __len__(self):
        return max(len(self.make_batch_sampler(self.epoch)) - self.skip, 0)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class EpochStats:
    """What one epoch has seen so far: meters for the progress line, per-step scalars still on the
    device (copied to the host once per log line), and the bad samples the collators dropped."""
    meters: Dict[str, SmoothedValue] = field(default_factory=lambda: defaultdict(SmoothedValue))
    pending: Dict[str, list] = field(default_factory=lambda: defaultdict(list))
    bad_samples: BadSampleTally = field(default_factory=BadSampleTally)
    skipped_steps: int = 0
    scale_skips: int = 0

    def add_batch(self, batch: dict, out: Dict[str, torch.Tensor]):
        self.bad_samples.add(batch)
        for k, v in out.items():  # kept on the device: no GPU sync per step
            self.pending[k].append(v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v)))

    def flush(self):
        """Move the pending scalars to the meters: one host copy per key."""
        for k, values in self.pending.items():
            for v in torch.stack([t.to(values[0].device) for t in values]).tolist():
                self.meters[k].update(v)
        self.pending.clear()


class Trainer:
    """Runs ``cfg.epochs`` epochs of ``step_fn`` over ``dataset`` with DDP, AMP, accumulation,
    checkpoints every ``cfg.ckpt_every`` optimizer steps and at each epoch end, and exact resume
    (module docstring).

    make_batch_sampler(epoch) -> an iterable of index lists for this rank (the same count on every
    rank); step_fn(model, batch, step) -> dict of scalar tensors with "loss".
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, out_dir: str, dataset, collate_fn,
                 make_batch_sampler: Callable[[int], Iterable], step_fn: Callable, info: DistInfo,
                 run_config: dict, log: Callable[[str], None] = print, on_epoch_end: Optional[Callable] = None):
        self.cfg, self.out_dir, self.info = cfg, out_dir, info
        self.step_fn, self.on_epoch_end = step_fn, on_epoch_end
        self.run_config = check_plain_data(run_config)  # checkpoints hold it: plain data, so weights_only loads it
        self.log = log if info.is_main else (lambda *_: None)
        os.makedirs(out_dir, exist_ok=True)
        model.to(info.device)
        self.ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if info.world_size > 1 else None
        self.model = self.ddp or model
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizers = build_optimizers(model, cfg)
        self.params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        self.batches = EpochBatches(make_batch_sampler)
        self.steps_per_epoch = len(self.batches) // cfg.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset gives fewer than {cfg.grad_accum_steps} batches of {cfg.batch_size} "
                             f"per process: lower --batch-size or --grad-accum-steps, or add data")
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.batches, collate_fn=collate_fn, num_workers=cfg.num_workers,
            pin_memory=info.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
            prefetch_factor=4 if cfg.num_workers else None,
            generator=torch.Generator().manual_seed(cfg.seed))  # its own: worker seeds never touch the global RNG
        factor = lambda step: lr_factor(step, self.steps_per_epoch, cfg)  # noqa: E731
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]
        self.amp = amp_settings(cfg.amp, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp.loss_scaling)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.nonfinite_streak = 0
        self.window_finite = torch.ones((), dtype=torch.bool, device=info.device)
        self.resumed_from: Optional[str] = None
        self.writer = MetricsWriter(out_dir, info.is_main)
        self.bad_sample_reporter = BadSampleReporter()  # one for the run: each bad file is warned about once

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rngs = [rng_state()]
        if self.info.world_size > 1:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng_state())
        model = unwrap(self.model)
        return {"model": model.state_dict(), "model_config": config_to_dict(model.config),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "rng": rngs, "world_size": self.info.world_size,
                "layout": batch_layout(self.cfg, self.info.world_size), "run_config": self.run_config}

    def save_checkpoint(self):
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        if self.info.is_main:
            save_torch(state, os.path.join(self.out_dir, f"ckpt_{self.step:08d}.pt"))
            for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
                os.remove(old)  # only once the new checkpoint is safely on disk
        if self.info.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, path: str, ckpt: Optional[dict] = None):
        ckpt = ckpt if ckpt is not None else read_training_checkpoint(path)
        self.check_same_run(path, ckpt)
        self.check_layout(path, ckpt)
        unwrap(self.model).load_state_dict(ckpt["model"])
        for o, s in zip(self.optimizers, ckpt["optimizers"]):
            kernels = [(g.get("fused"), g.get("foreach")) for g in o.param_groups]
            o.load_state_dict(s)
            for g, (fused, foreach) in zip(o.param_groups, kernels):  # this run's choice, not the saved run's
                g["fused"], g["foreach"] = fused, foreach
        for sch, s in zip(self.schedulers, ckpt["schedulers"]):
            sch.load_state_dict(s)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        set_rng_state(ckpt["rng"][self.info.rank])
        self.writer.cut_after(self.step)
        self.log(f"resumed from {path} at epoch {self.epoch}, step {self.step}")

    def check_layout(self, path: str, ckpt: dict):
        """Refuse to continue a run with another batch layout: the epoch length, the position inside
        the epoch and the decay epochs would all silently change."""
        world = ckpt.get("world_size", len(ckpt["rng"]))
        train = ckpt.get("run_config", {}).get("train", {})
        saved = ckpt.get("layout") or {"batch_size": train.get("batch_size"),
                                       "grad_accum_steps": train.get("grad_accum_steps"), "world_size": world}
        now = batch_layout(self.cfg, self.info.world_size)
        if saved != now:
            differs = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in now if saved.get(k) != now[k])
            raise RunFolderError(
                f"{path} was written by a run with {saved}; this run has {differs}. Resuming would change the "
                f"epoch length and the lr schedule. Resume with the same --batch-size, --grad-accum-steps and "
                f"number of processes, or start a new run from its weights: --init {path} with another "
                f"--output-dir (or --resume none).")

    def check_same_run(self, path: str, ckpt: dict):
        """Refuse a checkpoint of another run: another task, or another model configuration (whose
        tensors would not fit, or would mean another network); warn when the data flags changed."""
        ways_out = (f"Give this run another --output-dir, start afresh here with --resume none (the earlier run "
                    f"is moved aside), or start from that run's weights with --init {path}")
        saved_config = ckpt.get("run_config", {})
        saved_task, task = saved_config.get("task", "pretrain"), self.run_config.get("task", "pretrain")
        if saved_task != task:
            raise RunFolderError(f"{path} is a checkpoint of a {saved_task!r} run; this is a {task!r} run. {ways_out}.")
        saved_model, model = ckpt.get("model_config", {}), config_to_dict(unwrap(self.model).config)
        differs = [f"{name} {saved_model[name]!r} -> {value!r}" for name, value in model.items()
                   if name in saved_model and name not in RESUMABLE_MODEL_FIELDS
                   and json.dumps(saved_model[name]) != json.dumps(value)]
        if differs:
            raise RunFolderError(f"{path} was written with another model configuration: {', '.join(differs)}. "
                                 f"{ways_out}.")
        saved_data, data = saved_config.get("data", {}), self.run_config.get("data", {})
        for name in sorted(set(saved_data) | set(data)):
            if saved_data.get(name) != data.get(name):
                self.log(f"warning: resuming {path} with another --{name.replace('_', '-')}: "
                         f"{saved_data.get(name)!r} -> {data.get(name)!r} (the run continues on the new data)")

    def resume(self, spec: Optional[str]):
        """``spec`` "auto" takes the newest valid checkpoint in the run folder (none there: start
        fresh; some there but none readable: refuse, rather than silently redo days of work)."""
        if self.info.is_main:
            for path in remove_interrupted_checkpoint_writes(self.out_dir):
                self.log(f"removed {path}: the temporary file of a checkpoint write that was interrupted")
        if not spec:
            if self.info.is_main:
                self.start_afresh()
            return
        found = newest_valid_checkpoint(self.out_dir) if spec == "auto" else (spec, None)
        if found is None and list_checkpoints(self.out_dir):
            raise RunFolderError(f"no readable checkpoint in {self.out_dir}: every ckpt_*.pt there is damaged or "
                             f"foreign (see the warnings above). Resume from another copy with --resume PATH, or "
                             f"start afresh with --resume none (which moves them into a previous-<time> folder)")
        if found is None:
            self.log(f"no checkpoint in {self.out_dir}: starting from scratch")
            return
        self.load_checkpoint(*found)
        self.resumed_from = found[0]

    def start_afresh(self):
        moved_to = set_aside_previous_run(self.out_dir)  # this run has written no metrics yet
        if moved_to:
            self.log(f"--resume none: the earlier run in {self.out_dir} (checkpoints, metrics, weights) was moved "
                     f"to {moved_to}; this run starts from step 0")

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, max_steps: Optional[int] = None):
        cfg, info = self.cfg, self.info
        total_steps = self.steps_per_epoch * cfg.epochs
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)
        self.log(f"training {total_steps} optimizer steps: {cfg.epochs} epochs x {self.steps_per_epoch} steps, "
                 f"{cfg.batch_size} per process x {cfg.grad_accum_steps} accumulation x {info.world_size} "
                 f"processes = {cfg.batch_size * cfg.grad_accum_steps * info.world_size} samples per step; "
                 f"precision {self.amp.reason}")
        self.clock = RateClock(total_steps, self.step)
        try:
            while self.epoch < cfg.epochs and self.step < total_steps:
                self.train_one_epoch(total_steps)
        except KeyboardInterrupt:
            newest = list_checkpoints(self.out_dir)
            raise RunInterrupted(
                f"interrupted at step {self.step}: " + (f"the newest checkpoint is {newest[-1]}; run the same command "
                                                        "again to resume from it" if newest else
                                                        "no checkpoint was written yet")) from None
        # Stop the persistent DataLoader workers now, while nothing else refers to them: they hold memory
        # through the final evaluation otherwise, and stopping them from the garbage collector (the
        # Trainer is in reference cycles) waits out a 5 s timeout per worker.
        self.loader = None
        if info.world_size > 1:
            self.log(f"weights identical on all {info.world_size} ranks: {self.replicas_in_sync()}")
        if info.is_main:  # the trained weights alone, for finetune.py / evaluate.py / inference
            extra = {"task": self.run_config.get("task", "pretrain"), **self.run_config.get("model_extra", {})}
            save_model(unwrap(self.model), os.path.join(self.out_dir, "model.pt"), extra=extra)
            # the same model without pickle, in the layout models are shared in (saved_model.write_model_folder),
            # which carries the vocabulary: a run given none (a bare Trainer) writes model.pt alone
            if "vocab" in extra:
                save_model_folder(unwrap(self.model), os.path.join(self.out_dir, "model"), extra=extra)
        self.writer.close()
        return self

    def train_one_epoch(self, total_steps: int):
        usable = self.steps_per_epoch * self.cfg.grad_accum_steps  # micro-batches that end a step
        stats = EpochStats()
        self.batches.set_epoch(self.epoch, skip=self.batch_in_epoch)
        self.model.train()
        t_data = time.time()
        for batch in self.loader:
            stats.meters["data_time"].update(time.time() - t_data)
            self.micro_batch(batch, stats)
            if self.batch_in_epoch % self.cfg.grad_accum_steps == 0:
                grad_norm = self.optimizer_step(stats)
                if grad_norm is not None:
                    stats.pending["grad_norm"].append(grad_norm.detach().float())
                    self.after_step(stats, total_steps)
                if self.step >= total_steps or self.batch_in_epoch >= usable:
                    break  # leftover micro-batches that cannot complete a step are not run
            t_data = time.time()
        self.end_of_epoch(stats, epoch_done=self.batch_in_epoch >= usable)

    def micro_batch(self, batch: dict, stats: EpochStats):
        """Forward and backward of one batch; DDP all-reduces gradients only on the last micro-batch
        of an accumulation window."""
        last = (self.batch_in_epoch + 1) % self.cfg.grad_accum_steps == 0
        sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
        with sync:
            with self._autocast():
                if batch.get("num_samples", 1):
                    out = self.step_fn(self.model, batch, self.step)
                else:  # every sample was bad: a zero loss keeps this rank in step with the others
                    out = {"loss": sum(p.sum() * 0.0 for p in self.params)}
            self.scaler.scale(out["loss"] / self.cfg.grad_accum_steps).backward()
        self.window_finite &= torch.isfinite(out["loss"].detach()).all()
        self.batch_in_epoch += 1
        stats.add_batch(batch, out)
        self.bad_sample_reporter.report(batch.get("bad_samples", ()))
        self.check_bad_samples(stats)

    def optimizer_step(self, stats: EpochStats) -> Optional[torch.Tensor]:
        """Step every optimiser, or none of them: one non-finite gradient anywhere (CNN or
        transformer), or a non-finite loss, skips the whole step on every rank and backs the fp16
        loss scale off. Returns the gradient norm, or None when the step was skipped."""
        for o in self.optimizers:
            self.scaler.unscale_(o)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)  # inf / nan if any gradient is
        votes = torch.stack([self.window_finite, torch.isfinite(grad_norm)]).float()
        if self.info.world_size > 1:
            dist.all_reduce(votes, op=dist.ReduceOp.MIN)
        loss_ok, grads_ok = votes.tolist()  # one host sync per optimizer step
        self.window_finite = torch.ones_like(self.window_finite)
        if loss_ok and grads_ok:
            for o in self.optimizers:
                self.scaler.step(o)
            self.scaler.update()
            self._zero_grad()
            for s in self.schedulers:
                s.step()
            self.step += 1
            self.nonfinite_streak = 0
            return grad_norm
        self.skip_step(stats, loss_ok)
        return None

    def skip_step(self, stats: EpochStats, loss_ok: bool):
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.update()  # the unscaled gradients held an inf/nan: the fp16 scale backs off
        self._zero_grad()
        stats.skipped_steps += 1
        if loss_ok and scale is not None and scale >= 1.0:
            # fp16 gradients overflowed at this loss scale: expected while the scale calibrates
            stats.scale_skips += 1
            self.log(f"fp16 gradient overflow at step {self.step}: step skipped, loss scale {scale:g} -> "
                     f"{self.scaler.get_scale():g}")
            return
        self.nonfinite_streak += 1
        what = "gradient" if loss_ok else "loss"
        self.log(f"warning: non-finite {what} at step {self.step} ({self.nonfinite_streak} in a row); step skipped")
        if self.nonfinite_streak > self.cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} consecutive non-finite steps at step {self.step}: stopping. The last good "
                f"checkpoint is in {self.out_dir}; lower the lr, use --amp bf16/none, or check the data.")

    def check_bad_samples(self, stats: EpochStats, whole_epoch: bool = False):
        """Stop when too many samples are bad: a wrong image root must not train on nothing. Checked
        once ``bad_sample_check_after`` samples are seen, and at the end of an epoch whatever its size
        (so a small dataset whose every image is missing stops too)."""
        tally = stats.bad_samples
        if not tally.too_many(self.cfg.max_bad_sample_fraction):
            return
        if tally.seen < self.cfg.bad_sample_check_after and not whole_epoch:
            return
        raise BadDataError(
            f"{tally.bad} of the {tally.seen} samples seen in epoch {self.epoch} were bad (missing or unreadable "
            f"images, empty captions): more than --max-bad-sample-fraction {self.cfg.max_bad_sample_fraction}. "
            f"{tally.describe()}. Check that the image folder flags point at the folders "
            f"that hold these files (python -m pixel_bert.datasets verify checks a layout). The last good "
            f"checkpoint is in {self.out_dir}.")

    def after_step(self, stats: EpochStats, total_steps: int):
        if self.step % self.cfg.log_every == 0 or self.step == total_steps:
            stats.flush()
            self._log_progress(stats)
        if self.step % self.cfg.ckpt_every == 0:
            self.save_checkpoint()

    def end_of_epoch(self, stats: EpochStats, epoch_done: bool):
        self.check_bad_samples(stats, whole_epoch=True)
        stats.flush()
        summary = all_reduce_mean({k: m.global_avg for k, m in stats.meters.items()}, self.info)
        counts = all_reduce_mean({"bad": stats.bad_samples.bad, "skipped": stats.skipped_steps}, self.info)
        bad_total = int(round(counts["bad"] * self.info.world_size))
        finished = self.epoch
        if epoch_done:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.log(f"epoch {finished} {'done' if epoch_done else 'stopped'}: "
                 + "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k != "data_time")
                 + f"  bad samples skipped {bad_total}  steps skipped {stats.skipped_steps}"
                 + (f" ({stats.scale_skips} fp16 loss-scale overflows)" if stats.scale_skips else ""))
        self.writer.write({"kind": "epoch", "epoch": self.epoch, "step": self.step, **summary,
                           "bad_samples": bad_total, "skipped_steps": stats.skipped_steps})
        if epoch_done and self.on_epoch_end is not None:
            self.on_epoch_end(self)
        self.save_checkpoint()

    # ---- helpers ----------------------------------------------------------------------------------
    def _zero_grad(self):
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def _autocast(self):
        if self.amp.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp.dtype)

    def replicas_in_sync(self) -> bool:
        """True when every rank holds bit-identical parameters (DDP's promise, checked: one float64
        checksum per parameter, gathered from all ranks). BatchNorm running statistics are not
        compared: DDP copies rank 0's buffers at the start of each forward, and rank 0 saves them."""
        sums = torch.stack([p.detach().double().sum() for p in unwrap(self.model).parameters()]).to(self.info.device)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return torch.equal(low, high)

    def _log_progress(self, stats: EpochStats):
        total_steps = self.clock.total
        samples = self.clock.rate(self.step) * self.cfg.batch_size * self.cfg.grad_accum_steps * self.info.world_size
        lrs = [g["lr"] for o in self.optimizers for g in o.param_groups[:1]]
        values = {k: m.avg for k, m in stats.meters.items()}
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.info.device.type == "cuda" else 0.0
        parts = [f"epoch {self.epoch} step {self.step}/{total_steps}",
                 f"eta {self.clock.eta(self.step)}", f"{samples:.1f} samples/s"]
        parts += [f"{k} {v:.4f}" for k, v in values.items() if k not in ("data_time", "grad_norm")]
        parts += [f"lr {' '.join(f'{lr:.2e}' for lr in lrs)}", f"data {values.get('data_time', 0):.3f}s"]
        if mem:
            parts.append(f"mem {mem:.1f}G")
        self.log("  ".join(parts))
        self.writer.write({"kind": "train", "epoch": self.epoch, "step": self.step, "samples_per_s": samples,
                           "lr": lrs[0], **values, "max_mem_gb": mem})
