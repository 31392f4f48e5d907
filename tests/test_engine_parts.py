"""The pieces of the training loop, each alone: the optimizer builder, one epoch, evaluation,
the checkpointer and the epoch sampler; and the output helper the scripts share."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from data.loading import EpochSampler
from engine.checkpoint import Checkpointer, RunProgress, StopRequests, load_checkpoint
from engine.loop import Diverged, EpochStats, evaluate, train_one_epoch
from engine.optim import build_optimization
from engine.processes import ProcessInfo
from engine.settings import TrainSettings
from utils import Outputs, UserError

CPU = ProcessInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def settings(**changes) -> TrainSettings:
    return TrainSettings(**{"epochs": 4, "batch_size": 2, "lr": 0.1, "weight_decay": 0.0, "channels_last": False,
                            "progress": False, **changes})


def batches(n: int = 3, value: float = 1.0):
    """Float batches of 2 two-feature samples, labels 0 and 1."""
    return [(torch.full((2, 2), value), torch.tensor([0, 1]), 0) for _ in range(n)]


def test_build_optimization_chooses_the_schedule_and_the_scaler():
    model = nn.Linear(2, 2)
    step = build_optimization(model, settings(schedule="step", step_size=2), CPU.device)
    cosine = build_optimization(model, settings(schedule="cosine"), CPU.device)
    lrs = []
    for _ in range(4):
        lrs.append((step.lr, cosine.lr))
        step.optimizer.step()
        cosine.optimizer.step()
        step.scheduler.step()
        cosine.scheduler.step()
    assert [round(s, 6) for s, _ in lrs] == [0.1, 0.1, 0.01, 0.01]
    assert [round(c, 6) for _, c in lrs] == [0.1, round(0.05 * (1 + math.cos(math.pi / 4)), 6), 0.05,
                                             round(0.05 * (1 + math.cos(3 * math.pi / 4)), 6)]
    assert not cosine.scaler.is_enabled() and cosine.amp_dtype is None
    assert build_optimization(model, settings(amp="bf16"), CPU.device).amp_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="schedule"):
        build_optimization(model, settings(schedule="linear"), CPU.device)


def test_train_one_epoch_counts_what_it_trained_on_and_stops_on_request():
    model = nn.Linear(2, 2)
    optimization = build_optimization(model, settings(), CPU.device)
    with StopRequests() as stop:
        stats = train_one_epoch(model, batches(3), optimization, CPU, settings(), 0, EpochStats(), None, stop)
        assert (stats.seen, stats.step, stats.stopped_by) == (6, 3, 0)
        assert 0 <= stats.correct <= 6 and stats.loss > 0
        stop.signum = 15
        stopped = train_one_epoch(model, batches(3), optimization, CPU, settings(), 1, EpochStats(), None, stop)
    assert (stopped.step, stopped.stopped_by, stopped.seen) == (1, 15, 2)  # the step in progress is finished


def test_train_one_epoch_raises_diverged_on_a_non_finite_loss():
    model = nn.Linear(2, 2)
    optimization = build_optimization(model, settings(), CPU.device)
    with StopRequests() as stop, pytest.raises(Diverged) as caught:
        train_one_epoch(model, batches(1) + batches(1, value=math.nan), optimization, CPU, settings(), 2,
                        EpochStats(), None, stop)
    assert (caught.value.epoch, caught.value.step) == (2, 1) and math.isnan(caught.value.value)


def test_evaluate_gives_the_mean_loss_and_accuracy():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0, loss of class 1 = log(1 + e)
    loss, acc = evaluate(model, batches(2), CPU, channels_last=False, amp_dtype=None, show=False)
    assert acc == 50.0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert loss == pytest.approx(expected, rel=1e-6)


def test_checkpointer_round_trip(tmp_path):
    model = nn.Linear(2, 2)
    optimization = build_optimization(model, settings(), CPU.device)
    optimization.optimizer.step()
    optimization.scheduler.step()
    files = Checkpointer(tmp_path / "b.pth", is_main=True)
    progress = RunProgress(epoch=1, step=3, best_acc=50.0, best_epoch=1, history=[{"epoch": 1}],
                           partial={"loss": 1.0, "correct": 1, "seen": 2, "skipped": 0, "time": 0.5})
    files.save_best(model)
    files.save_last(model, optimization, progress, {"arch": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.last.pth", "b.log.jsonl", "b.pth"]

    fresh = nn.Linear(2, 2)
    fresh_optimization = build_optimization(fresh, settings(), CPU.device)
    restored = Checkpointer.restore(load_checkpoint(files.last_path), fresh, fresh_optimization)
    assert restored == progress
    assert torch.equal(fresh.weight, model.weight) and fresh_optimization.lr == optimization.lr
    resumed = EpochStats.resumed(restored)
    assert (resumed.loss, resumed.seen, resumed.seconds, resumed.step) == (1.0, 2, 0.5, 3)
    assert EpochStats.resumed(RunProgress(epoch=2)) == EpochStats()

    elsewhere = Checkpointer(tmp_path / "other" / "b.pth", is_main=False)  # only the main process writes
    elsewhere.save_best(model)
    elsewhere.save_last(model, optimization, progress, {})
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("world_size", [1, 3])
def test_epoch_sampler_is_distributed_samplers_permutation(world_size):
    for rank in range(world_size):
        ours = EpochSampler(23, seed=5, rank=rank, world_size=world_size)
        theirs = DistributedSampler(range(23), num_replicas=world_size, rank=rank, seed=5 * 100_003)
        ours.set_epoch(2)
        theirs.set_epoch(2)
        assert list(ours) == list(theirs)
        ours.set_epoch(2, skip=4)
        assert list(ours) == list(theirs)[4:] and len(ours) == len(theirs) - 4


def test_outputs_check_first_write_all_or_nothing_and_list_what_they_wrote(tmp_path):
    with pytest.raises(UserError, match=r"^--fig .*: unknown image format"):
        Outputs({"--json": tmp_path / "a.json", "--fig": tmp_path / "f.xyz"})
    with pytest.raises(UserError, match=r"^--out .*is a directory"):
        Outputs({"report.md": tmp_path}, figures=(), flag="--out")
    outputs = Outputs({"--json": tmp_path / "a.json", "--csv": None, "--fig": tmp_path / "f.png"})
    assert "--json" in outputs and "--csv" not in outputs and outputs.image_format("--fig") == "png"
    outputs.add("--json", "{}\n")
    outputs.add("--fig", b"\x89PNG")
    written = []
    outputs.commit(announce=written.append)
    assert written == [tmp_path / "a.json", tmp_path / "f.png"] and (tmp_path / "a.json").read_text() == "{}\n"

    broken = Outputs({"--json": tmp_path / "b.json", "--csv": tmp_path / "b.csv"})
    broken.add("--json", "{}")
    broken.add("--csv", object())  # cannot be written: nothing may appear
    with pytest.raises(TypeError):
        broken.commit()
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "b.csv").exists()
