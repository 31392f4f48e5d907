"""This process's place in a run: single-process, or one rank of a ``torchrun`` job.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the process joins a process group,
NCCL on GPUs and gloo on CPUs; only rank 0 prints and writes files.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from utils import UserError, resolve_device


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


def join_process_group(device_name: str, timeout: float = 600.0,
                       announce: Callable[[str], None] | None = None) -> ProcessInfo:
    """This process's :class:`ProcessInfo`, joining the process group when started by
    ``torchrun``; ``device_name`` is a ``--device`` value (auto, cpu, cuda, cuda:N). The
    variables torchrun sets are checked first; while waiting for the other processes it says
    for what, and after ``timeout`` seconds (``--dist_timeout``) it stops with one line."""
    world_size, rank, local_rank = launch_variables()
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        if device.index >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                            "device(s); start at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fastest convolution algorithms for fixed input sizes
    if world_size > 1 and not dist.is_initialized():
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        (announce or (lambda text: print(text, flush=True)))(
            f"rank {rank} of {world_size}: waiting for the other {world_size - 1} process(es) at {where} "
            f"(up to {timeout:g} s, --dist_timeout)")
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        except Exception as err:  # noqa: BLE001 - the store's timeouts and connection errors vary by version
            detail = " ".join(str(err).split())[:160]
            raise UserError(f"rank {rank} of {world_size}: the other processes did not join at {where} within "
                            f"{timeout:g} s ({detail}); start all {world_size} (torchrun --nnodes ... "
                            "--nproc_per_node ...), check MASTER_ADDR/MASTER_PORT, or raise --dist_timeout") from None
    return ProcessInfo(rank, world_size, local_rank, device)


def launch_variables() -> tuple[int, int, int]:
    """``(WORLD_SIZE, RANK, LOCAL_RANK)`` as torchrun sets them (1, 0, 0 without it), checked:
    whole numbers, ``0 <= RANK < WORLD_SIZE``, and with several processes ``MASTER_ADDR`` and a
    ``MASTER_PORT`` from 1 to 65535. Anything else is a :class:`UserError` naming the variable."""
    def number(name: str, default: str, low: int, high: int | None = None) -> int:
        text = os.environ.get(name, default).strip()
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}"
            raise UserError(f"{name}={text[:40]!r}: must be a whole number {bounds}; start the script with "
                            "torchrun, which sets it, or unset it for a single process")
        return value

    world_size = number("WORLD_SIZE", "1", 1)
    rank = number("RANK", "0", 0, world_size - 1)
    local_rank = number("LOCAL_RANK", "0", 0, world_size - 1)
    if world_size > 1:
        if not os.environ.get("MASTER_ADDR", "").strip():
            raise UserError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: the processes cannot find "
                            "each other; start the script with torchrun, which sets it")
        number("MASTER_PORT", "", 1, 65535)
    return world_size, rank, local_rank


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
