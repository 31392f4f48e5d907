"""The paper's study end to end, offline, on the embedded synthetic benchmark
(``python reproduce.py``; docs/analysis.md).

* :mod:`study.presets`: what decides the numbers (presets, pre-training regimes, targets);
* :mod:`study.runs`: the cached, resumable training runs and the data set statistics;
* :mod:`study.analysis`: T and the scale-free T of every run, shrink, the verdicts, the
  error of a fresh initialisation, the estimators' agreement;
* :mod:`study.report`, :mod:`study.figures`: report.md and the regimes figure;
* :mod:`study.cli`: the command line.
"""
