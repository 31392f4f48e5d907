"""Benchmark: the main job, ``python cal_transferability.py`` on the demo checkpoints, against
merely starting Python with the libraries it needs (``import torch, matplotlib.pyplot``),
quiet and with the cores kept busy, all in this one run.

    python bench/bench_startup.py [--repeats 5] [--busy N] [--busy_seconds 600]

The two commands run alternately (so that a change of load hits both), each as a new process;
the medians and their ratio are printed (target: the main job within 1.5x of the imports).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from busy import busy_cores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], folder: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def row(label: str, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as folder:  # the figure goes there, not into the repository
        imports, main = [], []
        for _ in range(repeats):
            imports.append(run([sys.executable, "-c", "import torch, matplotlib.pyplot"], folder))
            main.append(run([sys.executable, str(REPO / "cal_transferability.py"), "--fig",
                             os.path.join(folder, "t.png")], folder))
    t_imports, t_main = statistics.median(imports), statistics.median(main)
    print(f"{label:<16} import torch, matplotlib.pyplot {t_imports:6.2f} s   python cal_transferability.py "
          f"{t_main:6.2f} s   {t_main / t_imports:5.2f}x (target <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2,
                        help="busy processes of the loaded row (default: one per core; 0: no loaded row)")
    parser.add_argument("--busy_seconds", type=float, default=600.0, help="the most a busy process runs")
    args = parser.parse_args()
    print(f"median of {args.repeats} runs each, alternating; {os.cpu_count()} cores")
    row("quiet", args.repeats)
    if args.busy > 0:
        with busy_cores(args.busy, args.busy_seconds):
            row(f"loaded ({args.busy} busy)", args.repeats)


if __name__ == "__main__":
    main()
