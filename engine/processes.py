"""This process's place in a run: single-process, or one rank of a ``torchrun`` job.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the process joins a process group,
NCCL on GPUs and gloo on CPUs; only rank 0 prints and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from utils import resolve_device


@dataclass(frozen=True)
class ProcessInfo:
    """One process's rank among ``world_size`` processes, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
        """``values`` combined over every process (as they are in a single-process run)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def printer(self, announce: Callable[[str], None] | None = None) -> Callable[[str], None]:
        """``announce`` (default: print and flush) on the main process, silence elsewhere."""
        if not self.is_main:
            return lambda text: None
        return announce or (lambda text: print(text, flush=True))


def join_process_group(device_name: str) -> ProcessInfo:
    """This process's :class:`ProcessInfo`, joining the process group when started by
    ``torchrun``; ``device_name`` is a ``--device`` value (auto, cpu, cuda, cuda:N)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fastest convolution algorithms for fixed input sizes
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ProcessInfo(rank, world_size, local_rank, device)


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa inputs, fp32 accumulation) for convolutions and matrix products
    alike, on GPUs that have it (Ampere and newer). The seed's PyTorch 1.8 used TF32 for
    both; PyTorch 1.12 and later leave it on for cuDNN convolutions only, so it is set here
    explicitly either way."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def leave_process_group(process: ProcessInfo) -> None:
    if process.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(process: ProcessInfo) -> None:
    if process.distributed:
        dist.barrier()
