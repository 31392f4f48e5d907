"""Training: the loop that pre-training and fine-tuning share, and what runs it.

- :mod:`engine.settings` — :class:`TrainSettings`, what the loop needs to know;
- :mod:`engine.optim` — the optimizer, the learning-rate schedule and the gradient scaler;
- :mod:`engine.loop` — :func:`fit`, :func:`train_one_epoch`, :func:`evaluate`;
- :mod:`engine.checkpoint` — the run's best / last / log files, resuming, stop signals;
- :mod:`engine.processes` — this process's place under ``torchrun``;
- :mod:`engine.runs` — a whole run from a :class:`TrainJob` (the scripts' and reproduce.py's entry);
- :mod:`engine.cli` — the flags the two training scripts share.

Sample order, per-sample seeds and the in-memory cache are on the data side
(:mod:`data.loading`).
"""
from engine.checkpoint import run_files
from engine.cli import add_training_arguments, job_from_args
from engine.loop import FitResult, fit
from engine.runs import TrainJob, finetune, pretrain, run_training
from engine.settings import TrainSettings

__all__ = ["FitResult", "TrainJob", "TrainSettings", "add_training_arguments", "finetune", "fit", "job_from_args",
           "pretrain", "run_files", "run_training"]
