"""torch.distributed helpers: one code path for a single process and for ``torchrun`` (gloo or NCCL)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.core.errors import DistillError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICES = ("auto", "cpu", "cuda")


class DeviceError(DistillError, ValueError):
    """A device that this machine does not have."""


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when available; ``cuda`` on a machine without it is an error, not a silent CPU run."""
    if device not in DEVICES:
        raise DeviceError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device on this machine")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


TIMEOUT_S = 3600.0
"""Default process-group timeout: long enough for rank 0 to evaluate and checkpoint an ImageNet epoch while
the other ranks wait at the epoch's barrier; set DISTILL_PG_TIMEOUT (seconds) to change it."""


def timeout() -> timedelta:
    """The collectives' timeout: a rank that waits longer fails with an error naming the collective."""
    text = os.environ.get("DISTILL_PG_TIMEOUT", "")
    try:
        seconds = float(text) if text else TIMEOUT_S
    except ValueError:
        raise DeviceError(f"DISTILL_PG_TIMEOUT={text!r}: expected seconds, e.g. 3600") from None
    return timedelta(seconds=seconds)


def setup(device: str = "auto") -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick a device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout())
    return DistEnv(rank, world, local_rank, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
