"""Busy processes for the loaded rows of the benchmarks: each keeps one core busy in pure
Python and ends by itself after a time limit, so that none outlives a benchmark that dies."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Iterator

SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_cores(count: int, seconds: float) -> Iterator[list[subprocess.Popen]]:
    """``count`` spinning processes, each ending after ``seconds`` at most, stopped on exit."""
    processes = [subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them start spinning
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait()
