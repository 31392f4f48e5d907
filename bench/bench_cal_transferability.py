"""Benchmark: cal_transferability.py on a ResNet-50 trio against reading the files alone
and against the naive approach, all measured in this one run.

    python bench/bench_cal_transferability.py [--repeats 7] [--n_finetuned 12] [--dir DIR]

It writes ResNet-50 checkpoints (about 100 MB each) into a temporary folder (or --dir),
then reports the median wall time, with the page cache warm, of:

* read:   torch.load(weights_only=True) of theta_r, theta_A and one theta_FB, every byte
          read into memory (what any tool must at least do);
* ours:   cal_transferability.main() for that trio (parsing, loading, architecture
          inference and checks, distances, printing; no figure);
* naive:  build three torchvision ResNet-50s, load each state dict, and iterate
          named_parameters() computing (p - q).abs().mean() on the CPU;
* scaling: ours with 1, 4 and --n_finetuned fine-tuned files, to show the cost per extra
          theta_FB (theta_r and theta_A are read once);
* loaded: read and ours again while --busy processes (default: one per core) spin on the
          cores, each ending by itself after --busy_seconds at most; ours with its default
          --threads 1 and with --threads set to torch's default, to show what one thread avoids.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import script_start  # noqa: E402,F401  (as the scripts: before torch)

import torch  # noqa: E402
import torchvision  # noqa: E402

import cal_transferability  # noqa: E402
from utils import save_state_dict  # noqa: E402
from busy import busy_cores  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, lazy imports, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_checkpoints(folder: Path, n_finetuned: int) -> tuple[Path, Path, list[Path]]:
    torch.manual_seed(0)
    theta_r = torchvision.models.resnet50().state_dict()
    theta_a = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in theta_r.items()}
    paths_b = []
    for i in range(n_finetuned):
        path = folder / f"finetuned_{i:02d}.pth"
        if not path.exists():
            theta_b = {k: v + 0.001 * (i + 1) * torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in theta_a.items()}
            save_state_dict(theta_b, path)
        paths_b.append(path)
    for name, sd in (("random_init.pth", theta_r), ("pretrained.pth", theta_a)):
        if not (folder / name).exists():
            save_state_dict(sd, folder / name)
    return folder / "random_init.pth", folder / "pretrained.pth", paths_b


def read_only(paths) -> None:
    for path in paths:
        torch.load(path, map_location="cpu", weights_only=True)


def naive(path_r, path_a, path_b) -> list[float]:
    models = []
    for path in (path_r, path_a, path_b):
        model = torchvision.models.resnet50()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        models.append(model)
    params = [dict(m.named_parameters()) for m in models]
    out = []
    with torch.no_grad():
        for name, p_b in params[2].items():
            if name.endswith("weight") and p_b.dim() >= 2:
                d_r = (params[0][name] - p_b).abs().mean().item()
                d_a = (params[1][name] - p_b).abs().mean().item()
                out.append(d_r / d_a)
    return out


def ours(path_r, path_a, paths_b, threads: int | None = None) -> None:
    argv = ["-r", str(path_r), "-a", str(path_a), "-b", *map(str, paths_b), "--no_fig", "--device", "cpu"]
    argv += [] if threads is None else ["--threads", str(threads)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cal_transferability.main(argv) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n_finetuned", type=int, default=12)
    parser.add_argument("--dir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2,
                        help="busy processes of the loaded row (default: one per core; 0: no loaded row)")
    parser.add_argument("--busy_seconds", type=float, default=300.0,
                        help="the most a busy process runs (default: %(default)g); they are stopped sooner "
                        "when the row is measured")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path_r, path_a, paths_b = make_checkpoints(folder, args.n_finetuned)
        size = sum(p.stat().st_size for p in (path_r, path_a, paths_b[0])) / 2**20
        print(f"ResNet-50 trio: {size:.0f} MiB in 3 files; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; median of {args.repeats} warm runs")

        t_read = median_time(lambda: read_only((path_r, path_a, paths_b[0])), args.repeats)
        t_ours = median_time(lambda: ours(path_r, path_a, paths_b[:1]), args.repeats)
        t_naive = median_time(lambda: naive(path_r, path_a, paths_b[0]), args.repeats)
        print(f"read the 3 files only     {t_read * 1e3:8.1f} ms")
        print(f"cal_transferability       {t_ours * 1e3:8.1f} ms   {t_ours / t_read:5.2f}x of reading (target <= 1.3x)")
        print(f"naive (3 models, params)  {t_naive * 1e3:8.1f} ms   ours is {t_naive / t_ours:5.2f}x faster (target >= 2x)")

        counts = sorted({1, min(4, args.n_finetuned), args.n_finetuned})
        times = {n: median_time(lambda n=n: ours(path_r, path_a, paths_b[:n]), args.repeats) for n in counts}
        t_read_b = median_time(lambda: read_only(paths_b[:1]), args.repeats)
        per_b = (times[counts[-1]] - times[counts[0]]) / max(counts[-1] - counts[0], 1)
        for n in counts:
            print(f"cal_transferability, {n:2d} fine-tuned files  {times[n] * 1e3:8.1f} ms")
        print(f"cost per extra fine-tuned file {per_b * 1e3:.1f} ms = {per_b / t_read_b:.2f}x of reading one file "
              f"({t_read_b * 1e3:.1f} ms); fixed cost (r, A, setup) {(times[counts[0]] - per_b) * 1e3:.1f} ms")
        t_all = median_time(lambda: ours(path_r, path_a, paths_b[:1], default_threads), args.repeats)
        print(f"cal_transferability --threads {default_threads} (torch's default) {t_all * 1e3:8.1f} ms   "
              f"{t_all / t_read:5.2f}x of reading")
        if args.busy > 0:
            loaded_row(args, path_r, path_a, paths_b[0], default_threads)


def loaded_row(args, path_r, path_a, path_b, default_threads: int) -> None:
    """Reading and measuring while ``args.busy`` processes keep the cores busy."""
    with busy_cores(args.busy, args.busy_seconds) as busy:
        t_read = median_time(lambda: read_only((path_r, path_a, path_b)), args.repeats)
        t_ours = median_time(lambda: ours(path_r, path_a, [path_b]), args.repeats)
        t_all = median_time(lambda: ours(path_r, path_a, [path_b], default_threads), args.repeats)
        alive = sum(process.poll() is None for process in busy)
    print(f"loaded ({args.busy} busy processes on {os.cpu_count()} cores; {alive} still busy at the end):")
    print(f"  read the 3 files only     {t_read * 1e3:8.1f} ms")
    print(f"  cal_transferability       {t_ours * 1e3:8.1f} ms   {t_ours / t_read:5.2f}x of reading (target <= 2x)")
    print(f"  --threads {default_threads}               {t_all * 1e3:8.1f} ms   {t_all / t_read:5.2f}x of reading")


if __name__ == "__main__":
    main()
