"""Steps that every process takes together: a process whose whole batch was skipped as
corrupt (--skip_corrupt) still joins DistributedDataParallel's exchanges with a zero-weight
step, and an fp16 forward pass that overflows skips the update (as GradScaler does for
infinite gradients) instead of ending the run.

The distributed test starts two gloo processes on the CPU: this file run as a script is one
of them (``python tests/test_ddp_steps.py RANK DIR``).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from engine.checkpoint import StopRequests  # noqa: E402
from engine.loop import MAX_OVERFLOW_STEPS, Diverged, EpochStats, train_one_epoch  # noqa: E402
from engine.optim import build_optimization  # noqa: E402
from engine.processes import ProcessInfo  # noqa: E402
from engine.settings import TrainSettings  # noqa: E402

CPU = torch.device("cpu")
STEPS = 3
# scenario: (the steps at which rank 0's and rank 1's batches are empty, DDP's broadcast_buffers)
SCENARIOS = {
    "middle": (((), (1,)), False),  # each rank keeps its own BatchNorm statistics
    "first": (((), (0,)), True),  # as fit wraps the model: rank 0's statistics go to all before each forward
    "both": (((1,), (1,)), False),  # nobody has images at step 1: no update at all
}


def settings(**changes) -> TrainSettings:
    return TrainSettings(**{"epochs": 1, "batch_size": 4, "lr": 0.1, "weight_decay": 0.0, "channels_last": False,
                            "progress": False, **changes})


def tiny_model() -> nn.Module:
    """The first BatchNorm sees the images themselves, so its running statistics depend on
    the batches only, not on the weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def real_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * rank + step)
    return (torch.randn(4, 3, 8, 8, generator=generator) * (1 + rank) + step,
            torch.randint(0, 2, (4,), generator=generator))


def loader(rank: int, empty_steps) -> list[tuple]:
    """Batches as data.loading gives them; an empty one is what a batch of corrupt images becomes."""
    return [(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long), 2) if step in empty_steps
            else (*real_batch(rank, step), 0) for step in range(STEPS)]


def worker(rank: int, out_dir: Path) -> None:
    """One of the two processes: an epoch of every scenario, the results saved to ``out_dir``."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    process = ProcessInfo(rank=rank, world_size=2, local_rank=rank, device=CPU)
    for name, (empty, broadcast) in SCENARIOS.items():
        model = tiny_model()
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast)
        optimization = build_optimization(model, settings(), CPU)
        with StopRequests() as stop:
            stats = train_one_epoch(ddp, loader(rank, empty[rank]), optimization, process, settings(), 0,
                                    EpochStats(), None, stop)
        torch.save({"state": model.state_dict(), "stats": asdict(stats)}, out_dir / f"{name}.{rank}.pt")
    dist.destroy_process_group()


def simulated_weights(empty: tuple) -> dict[str, torch.Tensor]:
    """The weights two DDP processes should end with, in one process: each step's gradient
    is the mean over both ranks of their loss gradients, a rank without images adding zero;
    no update at all when neither has images."""
    model = tiny_model()
    optimization = build_optimization(model, settings(), CPU)
    for step in range(STEPS):
        present = [real_batch(rank, step) for rank in (0, 1) if step not in empty[rank]]
        if not present:
            continue
        optimization.optimizer.zero_grad()
        sum(nn.functional.cross_entropy(model(images), labels) for images, labels in present).div(2).backward()
        optimization.optimizer.step()
    return {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}


def input_statistics(rank: int, empty_steps) -> nn.BatchNorm2d:
    """The first BatchNorm's statistics after seeing only ``rank``'s non-empty batches."""
    norm = nn.BatchNorm2d(3)
    for step in range(STEPS):
        if step not in empty_steps:
            norm(real_batch(rank, step)[0])
    return norm


def test_a_rank_without_images_joins_every_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        for process in ranks:
            _, err = process.communicate(timeout=90)
            assert process.returncode == 0, err[-3000:]
    finally:
        for process in ranks:
            process.kill()
    for name, (empty, _) in SCENARIOS.items():
        results = [torch.load(tmp_path / f"{name}.{rank}.pt", weights_only=True) for rank in (0, 1)]
        states = [result["state"] for result in results]
        expected = simulated_weights(empty)
        for key, value in expected.items():
            assert torch.equal(states[0][key], states[1][key]), (name, key)  # the same steps on both ranks
            torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        for rank in (0, 1):
            stats = results[rank]["stats"]
            trained = STEPS - len(empty[rank])
            assert (stats["step"], stats["seen"], stats["skipped"]) == (STEPS, 4 * trained, 2 * len(empty[rank]))
            if rank == 0 or name != "first":  # "first": rank 1's statistics come from rank 0 before each forward
                # the stand-in forward left this rank's BatchNorm statistics alone (and the other rank's)
                assert states[rank]["0.num_batches_tracked"] == states[rank]["2.num_batches_tracked"] == trained
                reference = input_statistics(rank, empty[rank])
                assert torch.equal(states[rank]["0.running_mean"], reference.running_mean), name
                assert torch.equal(states[rank]["0.running_var"], reference.running_var), name


# ------------------------------------------------------------------------ fp16 overflow


def fp16_epoch(values: list[float], model: nn.Module | None = None, amp: str = "fp16"):
    """An epoch over batches of two samples filled with ``values`` (1e5: the fp16 logits are inf)."""
    model = model or nn.Linear(2, 2)
    optimization = build_optimization(model, settings(amp=amp), CPU)
    loader = [(torch.full((2, 2), value), torch.tensor([0, 1]), 0) for value in values]
    process = ProcessInfo(rank=0, world_size=1, local_rank=0, device=CPU)
    with StopRequests() as stop:
        stats = train_one_epoch(model, loader, optimization, process, settings(amp=amp), 0, EpochStats(), None, stop)
    return model, optimization, stats


def test_an_fp16_overflow_skips_the_update_and_lowers_the_scale():
    torch.manual_seed(0)
    model, optimization, stats = fp16_epoch([1.0, 1e5, 2.0])
    torch.manual_seed(0)
    without, reference, _ = fp16_epoch([1.0, 2.0])
    assert (stats.overflow_steps, stats.step, stats.seen) == (1, 3, 4) and math.isfinite(stats.loss)
    assert torch.equal(model.weight, without.weight) and torch.equal(model.bias, without.bias)
    assert optimization.scaler.get_scale() == reference.scaler.get_scale() / 2 == 32768.0
    # GradScaler's count of clean steps restarted at the overflow: one since (two in the run without it)
    assert (optimization.scaler.state_dict()["_growth_tracker"], reference.scaler.state_dict()["_growth_tracker"]) == (1, 2)


def test_fp16_overflows_in_a_row_end_the_run():
    _, optimization, stats = fp16_epoch(([1e5] * (MAX_OVERFLOW_STEPS - 1) + [1.0]) * 2)
    assert stats.overflow_steps == 2 * (MAX_OVERFLOW_STEPS - 1) and stats.seen == 4
    with pytest.raises(Diverged) as caught:
        fp16_epoch([1.0] + [1e5] * MAX_OVERFLOW_STEPS)
    assert caught.value.step == MAX_OVERFLOW_STEPS and not math.isfinite(caught.value.value)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_without_fp16_a_non_finite_loss_ends_the_run_at_once(amp):
    with pytest.raises(Diverged) as caught:
        fp16_epoch([1.0, math.nan, 1.0], amp=amp)
    assert caught.value.step == 1


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
