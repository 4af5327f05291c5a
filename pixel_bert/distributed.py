"""Processes: the torchrun process group, CPU threads per process, and splitting work across ranks.

Every script runs inside ``with distributed(args.device) as info:``; `DistInfo` says which rank this
is. Evaluation splits its items into contiguous shards (`shard_range`), never padded or repeated, and
gathers the results on rank 0.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


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
    many threads each should use: oversubscribed cores are far slower than idle ones."""
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
    exception"; docs/failures.md), so a worker of a multi-process run leaves without the C++
    destructors. A single process exits normally."""
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and/or torch.compile wrappers (checkpoints hold its state dict, so a run
    resumes with compilation on or off and on any number of processes)."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DataParallel
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def shard_range(n: int, info: DistInfo) -> range:
    """The contiguous block of ``range(n)`` this rank evaluates. Blocks never overlap and cover
    everything, so gathered results have no duplicates (unlike DistributedSampler, which pads
    with repeated items to equalise ranks)."""
    per = -(-n // info.world_size) if n else 0  # ceil
    start = min(info.rank * per, n)
    return range(start, min(start + per, n))


def gather_to_main(obj: Any, info: DistInfo) -> Optional[List[Any]]:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); ``[obj]`` without torchrun.
    Uses gather_object (pickles through the process group; fine for predictions and score
    blocks of a few hundred MB)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the metrics, so every rank returns the same)."""
    if info.world_size == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sharded_loader(dataset, info: DistInfo, batch_size: int, collate_fn, num_workers: int = 0):
    """A DataLoader over this rank's contiguous block of ``dataset`` (see `shard_range`), in order."""
    subset = torch.utils.data.Subset(dataset, list(shard_range(len(dataset), info)))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                       num_workers=num_workers, pin_memory=info.device.type == "cuda")
