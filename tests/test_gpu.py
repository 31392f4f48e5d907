"""The CUDA paths, on a GPU (skipped without one): training steps that never wait for the
device between checks, the image cache on the GPU, TF32 as the flag says, each rank's CUDA
random state, a ViT fine-tuned at its input size, JPEGs decoded on the GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU = torch.device("cuda", 0)


def gpu_process():
    from engine.processes import ProcessInfo

    return ProcessInfo(rank=0, world_size=1, local_rank=0, device=GPU)


def cached_loader(count: int = 64, batch: int = 16):
    from data.cache import ImageCache
    from data.loading import CachedLoader, EpochSampler

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 40, 40), dtype=torch.uint8, generator=generator)
    cache = ImageCache(images, torch.arange(count) % 4, torch.ones(count, dtype=torch.bool)).to(GPU)
    sampler = EpochSampler(count, seed=0)
    return CachedLoader(cache, sampler, batch, pin_memory=False), sampler


def test_training_steps_between_checks_never_wait_for_the_gpu(monkeypatch):
    """With torch.cuda.set_sync_debug_mode("error"), a whole epoch runs with the cache on the
    GPU and the batch augmentation; only the check step's read (allowed here) synchronises."""
    import engine.loop as loop
    from data.transforms import BatchAugment
    from engine.checkpoint import StopRequests
    from engine.optim import build_optimization
    from engine.settings import TrainSettings
    from models import build_model

    model = build_model("resnet20", 4).to(GPU, memory_format=torch.channels_last)
    settings = TrainSettings(epochs=2, batch_size=16, lr=0.1, weight_decay=1e-4, check_every=1000, progress=False)
    optimization = build_optimization(model, settings, GPU)
    loader, sampler = cached_loader()
    augment = BatchAugment(32)
    with StopRequests() as stop:  # warm-up: cuDNN's autotuner and the caches of constants
        loop.train_one_epoch(model, loader, optimization, gpu_process(), settings, 0, loop.EpochStats(), augment, stop)
    read = loop._DeviceTotals.read
    reads = []

    def allowed_read(self, stats):
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(stats.step)
            return read(self, stats)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(loop._DeviceTotals, "read", allowed_read)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)  # the epoch clock's own wait
    sampler.set_epoch(1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with StopRequests() as stop:
            stats = loop.train_one_epoch(model, loader, optimization, gpu_process(), settings, 1, loop.EpochStats(),
                                         augment, stop)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert reads == [3] and stats.seen == 64 and stats.step == 4


def test_the_cache_on_the_gpu_gives_the_batches_of_the_cpu_cache():
    from data.cache import ImageCache

    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    loaded = torch.tensor([i != 3 for i in range(10)])
    cpu = ImageCache(images, torch.arange(10), loaded)
    gpu = cpu.to(GPU)
    for index in ([0, 1, 2], [5, 3, 9, 3]):
        a, b = cpu.batch(index), gpu.batch(index)
        assert b[0].device.type == "cuda" and torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
        assert a[2] == b[2]


def test_batch_augment_on_the_gpu_matches_the_cpu():
    from data.transforms import BatchAugment

    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    cpu = BatchAugment(32, color_jitter=0.4)(images, torch.Generator().manual_seed(3))
    gpu = BatchAugment(32, color_jitter=0.4)(images.to(GPU), torch.Generator().manual_seed(3))
    assert (cpu - gpu.cpu()).abs().max() < 1e-4


def test_tf32_follows_the_flag_and_the_cuda_state_is_saved_per_rank(tmp_path):
    import finetune
    from engine.checkpoint import load_checkpoint
    from utils import run_cli

    argv = ["--dataset", "synthetic:classes=3,n=8,n_val=4,size=16", "--arch", "resnet20", "--device", "cuda",
            "--max_epoch", "1", "--batch_size", "8", "--from_scratch", str(tmp_path / "r.pth")]
    torch.save(__import__("models").build_model("resnet20", 3).state_dict(), tmp_path / "r.pth")
    assert run_cli(finetune.main, argv + ["--no-tf32", "-b", str(tmp_path / "b.pth")]) == 0
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert run_cli(finetune.main, argv + ["-b", str(tmp_path / "c.pth")]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    checkpoint = load_checkpoint(tmp_path / "c.last.pth")
    assert len(checkpoint["rng"]["cuda_by_rank"]) == 1


def test_a_vit_fine_tunes_on_a_32_px_data_set_at_224_px_on_the_gpu(tmp_path):
    import finetune
    from utils import run_cli

    torch.save(__import__("models").build_model("vit_s16", 3).state_dict(), tmp_path / "r.pth")
    argv = ["--dataset", "synthetic:classes=3,n=4,n_val=2,size=32", "--device", "cuda", "--max_epoch", "1",
            "--batch_size", "4", "--from_scratch", str(tmp_path / "r.pth"), "-b", str(tmp_path / "b.pth"),
            "--amp", "bf16"]
    assert run_cli(finetune.main, argv) == 0


def test_an_fp16_overflow_on_the_gpu_skips_its_step():
    from engine.checkpoint import StopRequests
    from engine.loop import EpochStats, train_one_epoch
    from engine.optim import build_optimization
    from engine.settings import TrainSettings

    model = nn.Linear(2, 2).to(GPU)
    settings = TrainSettings(epochs=1, batch_size=2, lr=0.1, weight_decay=0.0, amp="fp16", channels_last=False,
                             progress=False)
    optimization = build_optimization(model, settings, GPU)
    batches = [(torch.full((2, 2), v), torch.tensor([0, 1]), 0) for v in (1.0, 1e5, 2.0)]
    with StopRequests() as stop:
        stats = train_one_epoch(model, batches, optimization, gpu_process(), settings, 0, EpochStats(), None, stop)
    assert stats.overflow_steps == 1 and stats.seen == 4 and optimization.scaler.get_scale() < 65536
    assert torch.isfinite(model.weight).all()


def test_estimators_on_gpu_tensors_agree_with_the_cpu():
    """metrics/estimators.py computes on the device of the tensors it is given."""
    import numpy as np

    from metrics.estimators import estimate_all

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 600)
    features = (rng.normal(size=(600, 96)) + np.eye(6, 96)[labels]).astype(np.float32)
    logits = rng.normal(size=(600, 20)).astype(np.float32)
    on_cpu = estimate_all(features, logits, labels, k=5)
    on_gpu = estimate_all(torch.from_numpy(features).to(GPU), torch.from_numpy(logits).to(GPU),
                          torch.from_numpy(labels).to(GPU), k=5)
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_jpegs_decoded_on_the_gpu_match_the_cpu(tmp_path):
    """--decode device on a GPU (nvJPEG, and the resize there) against the same batch on the
    CPU (libjpeg-turbo, PIL's pixels): nvJPEG's inverse DCT may round differently, by a
    level or two in a few values."""
    from data.datasets import build_dataset
    from data.device_decode import DeviceDecoded
    from tests.test_device_decode import write_folder

    write_folder(tmp_path)
    dataset = DeviceDecoded(build_dataset("imagefolder", str(tmp_path), "train", None, False, 0), 32)
    batch, _, _ = dataset.collate([dataset[i] for i in range(len(dataset))])
    on_gpu, on_cpu = batch.decode(GPU), batch.decode(torch.device("cpu"))
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    difference = (on_gpu.cpu().int() - on_cpu.int()).abs().float()
    assert difference.mean() < 0.5 and difference.max() <= 8, (difference.mean(), difference.max())
    from data.device_decode import DecodedAhead  # training's way: decoded two batches ahead in a thread

    ahead = list(DecodedAhead([(batch, torch.zeros(len(batch)), 0)] * 3, GPU))
    assert len(ahead) == 3 and all(torch.equal(images, on_gpu) for images, _, _ in ahead)
