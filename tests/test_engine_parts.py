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
from engine.loop import Diverged, EpochStats, evaluate, train_one_epoch, validate
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
    files = Checkpointer(tmp_path / "b.pth", CPU)
    progress = RunProgress(epoch=1, step=3, best_acc=50.0, best_epoch=1, history=[{"epoch": 1}],
                           partial={"loss": 1.0, "correct": 1, "seen": 2, "skipped": 0, "time": 0.5})
    files.save_best(model)
    files.save_last(model, optimization, progress, {"arch": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.last.pth", "b.log.jsonl", "b.pth"]

    fresh = nn.Linear(2, 2)
    fresh_optimization = build_optimization(fresh, settings(), CPU.device)
    restored, note = files.restore(load_checkpoint(files.last_path), fresh, fresh_optimization)
    assert restored == progress and note is None
    assert torch.equal(fresh.weight, model.weight) and fresh_optimization.lr == optimization.lr
    resumed = EpochStats.resumed(restored)
    assert (resumed.loss, resumed.seen, resumed.seconds, resumed.step) == (1.0, 2, 0.5, 3)
    assert EpochStats.resumed(RunProgress(epoch=2)) == EpochStats()

    rank1 = ProcessInfo(rank=1, world_size=1, local_rank=0, device=torch.device("cpu"))  # only rank 0 writes
    elsewhere = Checkpointer(tmp_path / "other" / "b.pth", rank1)
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


def test_a_cpu_run_never_touches_cuda_and_restores_without_it(tmp_path, monkeypatch):
    """Resuming on another machine: a checkpoint with CUDA states of 8 GPUs (or the old
    format's rank-0 list) resumes on the CPU, and saving on the CPU never asks CUDA."""
    from engine.checkpoint import rng_state, set_rng_state

    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched in a CPU run")

    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = rng_state(CPU)
    assert state["cuda_by_rank"] == []
    state["cuda_by_rank"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    assert set_rng_state(state, CPU) is None
    legacy = {k: v for k, v in state.items() if k != "cuda_by_rank"} | {"cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    assert set_rng_state(legacy, CPU) is None


def test_cuda_states_of_another_number_of_processes_are_left_with_a_note(monkeypatch):
    """On a GPU, rank r restores the state rank r saved; with another number of processes
    (a smaller machine, CUDA_VISIBLE_DEVICES) nothing is restored and a note says so."""
    from engine.checkpoint import rng_state, set_rng_state

    restored = {}
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device.index: state}))
    gpu = ProcessInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))
    state = rng_state(CPU)
    state["cuda_by_rank"] = [torch.full((4,), 0, dtype=torch.uint8), torch.full((4,), 1, dtype=torch.uint8)]
    assert set_rng_state(state, gpu) is None and restored[1].tolist() == [1, 1, 1, 1]
    single = ProcessInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    note = set_rng_state(state, single)
    assert "2 process(es)" in note and "run of 1" in note and list(restored) == [1]


def test_tf32_is_one_switch_for_convolutions_and_matmuls():
    import finetune
    from engine import job_from_args
    from engine.processes import set_tf32

    # saved and restored by hand: torch's matmul switch is no plain attribute that monkeypatch can restore
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    argv = ["--dataset", "synthetic", "-a", "a.pth", "-b", "b.pth"]
    assert job_from_args(finetune.parse_args(argv)).tf32 is True  # the seed's PyTorch 1.8 default
    assert job_from_args(finetune.parse_args(argv + ["--no-tf32"])).tf32 is False


def test_ahead_yields_everything_in_order_passes_errors_and_stops_with_the_consumer():
    import threading
    import time

    from data.loading import ahead

    assert list(ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("broken image")

    with pytest.raises(ValueError, match="broken image"):
        list(ahead(failing(), depth=2))
    before = threading.active_count()
    consumer = ahead(iter(range(10**6)), depth=2)
    assert next(consumer) == 0
    consumer.close()  # the consumer stops early (a stop signal): the thread ends too
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_cached_loader_with_prefetch_gives_the_same_batches():
    from data.cache import ImageCache
    from data.loading import CachedLoader

    images = torch.arange(20 * 3 * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8).view(20, 3, 2, 2)
    cache = ImageCache(images, torch.arange(20), torch.tensor([i != 7 for i in range(20)]))
    sampler = EpochSampler(20, seed=3)
    sampler.set_epoch(1)
    plain = list(CachedLoader(cache, sampler, 6, pin_memory=False))
    ahead_ = list(CachedLoader(cache, sampler, 6, pin_memory=False, prefetch=2))
    assert len(plain) == len(ahead_) == 4 and sum(skipped for _, _, skipped in plain) == 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(plain, ahead_))


def varied_batches(n: int, nan_at: int | None = None):
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        images = torch.randn(4, 2, generator=generator)
        if i == nan_at:
            images[0, 0] = math.nan
        out.append((images, torch.tensor([0, 1, 1, 0]), 0))
    return out


def test_reading_the_loss_every_few_steps_trains_the_same_weights():
    """check_every only changes when the host reads the device's sums, never the weights;
    the counts are exact and the summed loss agrees to rounding."""
    results = []
    for every in (1, 4):
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        optimization = build_optimization(model, settings(), CPU.device)
        with StopRequests() as stop:
            stats = train_one_epoch(model, varied_batches(10), optimization, CPU, settings(check_every=every), 0,
                                    EpochStats(), None, stop)
        results.append((model.weight.detach().clone(), stats))
    (w1, s1), (w4, s4) = results
    assert torch.equal(w1, w4)
    assert (s1.seen, s1.correct, s1.step) == (s4.seen, s4.correct, s4.step) == (40, s1.correct, 10)
    assert s4.loss == pytest.approx(s1.loss, rel=1e-12)


def test_a_non_finite_loss_between_checks_is_caught_at_the_next_check_with_its_step():
    model = nn.Linear(2, 2)
    optimization = build_optimization(model, settings(), CPU.device)
    with StopRequests() as stop, pytest.raises(Diverged) as caught:
        train_one_epoch(model, varied_batches(10, nan_at=5), optimization, CPU, settings(check_every=4), 3,
                        EpochStats(), None, stop)
    assert caught.value.step == 5 and math.isnan(caught.value.value)  # found at the check after step 7


def test_a_stop_request_takes_effect_at_the_next_check_step():
    model = nn.Linear(2, 2)
    optimization = build_optimization(model, settings(), CPU.device)
    with StopRequests() as stop:
        stop.signum = 15
        stats = train_one_epoch(model, varied_batches(10), optimization, CPU, settings(check_every=4), 0,
                                EpochStats(), None, stop)
    assert (stats.stopped_by, stats.step, stats.seen) == (15, 4, 16)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_sees_full_batches_only_and_validation_has_its_own_graph(tmp_path, monkeypatch, mode):
    """--compile: one static graph for training and one for validation; a smaller last batch
    (and anything else not of the full batch size) runs eagerly instead of recompiling. In a
    mode that records CUDA graphs, every compiled call starts a new step for them."""
    import engine.loop as loop
    from data.transforms import BatchAugment
    from models import build_model

    calls, steps = [], []

    def fake_compile(module, dynamic=None, mode="unset"):
        assert dynamic is False and mode == (None if mode_asked == "default" else mode_asked)
        index = len(calls)
        calls.append([])

        def compiled(images):
            calls[index].append((images.shape[0], module.training))
            return module(images)
        return compiled

    mode_asked = mode
    monkeypatch.setattr(loop.torch, "compile", fake_compile)
    monkeypatch.setattr(loop.torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(sum(map(len, calls))))

    class Tiny(torch.utils.data.Dataset):
        classes = [0, 1]

        def __init__(self, count):
            self.count = count

        def __len__(self):
            return self.count

        def __getitem__(self, index):
            return torch.full((3, 8, 8), index, dtype=torch.uint8), index % 2

    result = loop.fit(build_model("resnet20", 2), Tiny(10), Tiny(6), settings(epochs=1, batch_size=4, compile=True,
                      compile_mode=mode, cache="off", workers=0), CPU, tmp_path / "b.pth",
                      announce=lambda text: None, augment=BatchAugment(8))
    assert len(result.history) == 1 and len(calls) == 2
    train_calls, eval_calls = calls
    assert train_calls == [(4, True), (4, True)]  # the last batch of 2 ran eagerly
    assert eval_calls == [(4, False)]  # validation's last batch of 2 too
    assert steps == ([0, 1, 2] if mode == "reduce-overhead" else [])  # marked before each compiled call


class SignallingSet(torch.utils.data.Dataset):
    """``count`` deterministic images of two classes (``size`` px, 8 by default); reading
    ``signal_at`` (once) sends this process SIGTERM."""

    classes = [0, 1]

    def __init__(self, count: int, signal_at: int | None = None, offset: int = 0, size: int = 8) -> None:
        self.count, self.signal_at, self.offset, self.size = count, signal_at, offset, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        import os
        import signal

        if index == self.signal_at:
            self.signal_at = None
            os.kill(os.getpid(), signal.SIGTERM)
        generator = torch.Generator().manual_seed(index + self.offset)
        return torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=generator), index % 2


def fit_tiny(path, train, val, resume=None):
    import engine.loop as loop
    from data.transforms import BatchAugment
    from models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 2)
    result = loop.fit(model, train, val, settings(epochs=3, batch_size=4, cache="off", workers=0), CPU, path,
                      resume=resume, announce=lambda text: None, augment=BatchAugment(8))
    return result, model


@pytest.mark.parametrize("where", ["last training batch", "validation"])
def test_a_stop_after_the_last_batch_or_in_validation_resumes_bit_identical(tmp_path, where):
    """A stop request that arrives while the epoch's last batch (index order: the sampler's)
    or the validation set is read must leave a checkpoint that resumes to the weights of a
    run never stopped."""
    from data.loading import EpochSampler
    from engine.checkpoint import load_checkpoint

    _, reference = fit_tiny(tmp_path / "a.pth", SignallingSet(10), SignallingSet(6, offset=100))
    last_index = list(EpochSampler(10, seed=0))[-1]  # read in the last batch of the first epoch
    train = SignallingSet(10, signal_at=last_index if where.startswith("last") else None)
    val = SignallingSet(6, signal_at=3 if where == "validation" else None, offset=100)
    stopped, _ = fit_tiny(tmp_path / "b.pth", train, val)
    assert stopped.stopped_by == 15
    checkpoint = load_checkpoint(tmp_path / "b.last.pth")
    result, resumed = fit_tiny(tmp_path / "b.pth", SignallingSet(10), SignallingSet(6, offset=100), checkpoint)
    assert result.stopped_by == 0 and len(result.history) == 3
    for key, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[key]), key


def test_validate_counts_the_corrupt_images_it_skipped():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0
    lost_one = [(torch.ones(1, 2), torch.tensor([0]), 1), (torch.empty(0), torch.empty(0, dtype=torch.long), 2)]
    loss, acc, skipped = validate(model, batches(1) + lost_one, CPU, channels_last=False, amp_dtype=None, show=False)
    assert skipped == 3 and acc == pytest.approx(200 / 3)  # over the 3 images that loaded
    assert evaluate(model, lost_one, CPU, channels_last=False, amp_dtype=None, show=False)[1] == 100.0


def test_a_stop_during_the_last_validation_is_reported_and_the_run_is_complete(tmp_path):
    import engine.loop as loop
    from data.transforms import BatchAugment
    from engine.checkpoint import load_checkpoint
    from models import build_model

    said = []
    result = loop.fit(build_model("resnet20", 2), SignallingSet(10), SignallingSet(6, signal_at=2, offset=100),
                      settings(epochs=1, batch_size=4, cache="off", workers=0), CPU, tmp_path / "b.pth",
                      announce=said.append, augment=BatchAugment(8))
    assert result.stopped_by == 15 and len(result.history) == 1
    assert "after the last epoch; the run is complete" in said[-1]
    assert load_checkpoint(tmp_path / "b.last.pth")["epoch"] == 1


def test_a_named_pipe_given_to_resume_is_refused_without_waiting(tmp_path):
    import os

    from engine.checkpoint import load_checkpoint
    from utils import UserError

    fifo = tmp_path / "b.last.pth"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        load_checkpoint(fifo)
