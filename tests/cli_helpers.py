"""Helpers the reliability tests share (imported by name: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from utils import run_cli

# The training flags that make a one-epoch run on a tiny synthetic task fast.
FAST = ["--arch", "resnet20", "--batch_size", "16", "--workers", "0", "--device", "cpu", "--max_epoch", "1"]
TARGET = "synthetic:classes=4,n=12,n_val=4,size=16,gap=0.5"


def refused(capsys, main, argv, *needles: str) -> str:
    """Run a script's ``main``: status 2, no traceback, the last line of stderr holding every needle."""
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]
