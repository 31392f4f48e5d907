"""The paper's study end to end, offline, on the embedded synthetic benchmark.

    python reproduce.py                 # the default study, two pre-training regimes
    python reproduce.py --quick         # a check of the whole pipeline in minutes
    python reproduce.py --device cuda --out runs/gpu_study

It pre-trains a ResNet-20 on the synthetic source task in each of the preset's pre-training
regimes (lr and weight decay), fine-tunes each on a grid of synthetic targets that vary domain
gap, intraclass variance and data amount one at a time (several levels each, several seeds),
measures T and the scale-free T for each, and N, G, D for each target, fits the regression,
draws the figures, and writes ``OUT/report.md``: the regimes side by side, how much of T the
shrinking of the weights explains, the table in the paper's format, the fitted equations, the
verdicts on the paper's two findings under both metrics, the error of a fresh initialisation
and the feature-based estimators.

Every finished run is cached under OUT by a hash of its configuration: a killed study
resumes where it stopped (an interrupted training run continues from its checkpoint), and a
second call only redoes what changed. SIGINT (Ctrl-C) or SIGTERM stops the study with one
line and exit status 128 + the signal number (130, 143); running it again resumes it.
The code is in the ``study`` package.
"""
from __future__ import annotations

import script_start  # noqa: F401  (first: how CPU threads wait, Ctrl-C while importing)

import sys

from study.cli import main
from utils import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
