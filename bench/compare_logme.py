"""Compare the project's LogME with the public implementation by its authors (thuml/LogME).

    python bench/compare_logme.py --thuml PATH/TO/LogME.py [--repeats 3]

The file is not part of this project: download it from https://github.com/thuml/LogME. It
uses numba's ``njit`` only to speed up plain NumPy code; without numba installed, the
functions run as they are (the same numbers, slower). Both of its variants are compared: the
ICML 2021 iteration (``_fit_icml``) and the fixed-point one its ``fit`` uses
(``_fit_fixed_point``). Each case draws features from class centres plus unit noise
(``signal``: the centres' scale), and the largest absolute difference over ``--repeats`` draws
is printed; the project's value is the maximum of the evidence (docs/estimators.md), which
tests/test_estimators.py checks against a general optimiser.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics.estimators import logme  # noqa: E402

# (samples, dimensions, classes, signal)
CASES = [(50, 200, 100, 1.0), (100, 500, 100, 1.0), (10, 300, 3, 1.0), (500, 64, 10, 1.0), (200, 30, 5, 0.5),
         (500, 64, 10, 0.05), (2000, 128, 10, 0.02)]


def load_thuml(path: Path):
    if "numba" not in sys.modules:
        try:
            import numba  # noqa: F401
        except ImportError:  # njit only compiles; the undecorated functions compute the same
            stub = types.ModuleType("numba")
            stub.njit = lambda function: function
            sys.modules["numba"] = stub
    spec = importlib.util.spec_from_file_location("thuml_logme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LogME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thuml", type=Path, required=True, help="the LogME.py of github.com/thuml/LogME")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    thuml = load_thuml(args.thuml)
    rng = np.random.default_rng(0)
    print(f"{'n':>5} {'d':>4} {'classes':>7} {'signal':>6}   {'ours':>9} {'|ours - ICML|':>14} "
          f"{'|ours - fixed point|':>21}")
    for n, d, classes, signal in CASES:
        gaps, first = [], None
        for _ in range(args.repeats):
            labels = rng.integers(0, classes, n)
            features = signal * rng.normal(size=(classes, d))[labels] + rng.normal(size=(n, d))
            ours = logme(features, labels)
            icml = thuml()._fit_icml(features, labels)
            fixed = thuml()._fit_fixed_point(features, labels)
            gaps.append((abs(ours - icml), abs(ours - fixed)))
            first = ours if first is None else first
        gaps = np.array(gaps)
        print(f"{n:>5} {d:>4} {classes:>7} {signal:>6}   {first:>9.5f} {gaps[:, 0].max():>14.2e} "
              f"{gaps[:, 1].max():>21.2e}")


if __name__ == "__main__":
    main()
