"""data/paper_curves.csv: the paper's ResNet-50 layer-wise transferability curves.

CIFAR-10 is the seed's printout; the other eleven curves were read off the paper's figure
(see data/paper_curves.md). The cross-check is against the paper's published overall T in
data/paper_table.csv: T is the mean of the 17 non-head points, so the mean of each curve must
agree with it. Measured agreement of the digitised curves is 0.26 % or better (DomainNet-p),
i.e. at most 0.45 of the panel's stated precision, so the tolerance below is
min(precision, 0.5 % of T) + 0.005 (the published T is rounded to 2 decimals). Aircraft is the
exception: its figure panel averages 15.5, not the published 12.45 (the paper's figure and
table disagree); that is pinned separately so that nobody rescales the digitised points.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
CURVES = DATA / "paper_curves.csv"
TABLE = DATA / "paper_table.csv"
HEADER = ["dataset", "point", "transferability", "source", "precision"]
N_POINTS = 18
PRINTED_CIFAR10 = [3.44, 7.76, 8.59, 7.3, 5.42, 9.2, 6.1, 5.52, 4.23, 7.65, 8.3, 8.32, 8.86,
                   8.88, 5.96, 13.0, 13.81, 1.0]
# The mean of the Aircraft panel as digitised, far from the published 12.45.
AIRCRAFT_FIGURE_MEAN = 15.50


@pytest.fixture(scope="module")
def table() -> dict[str, float]:
    with TABLE.open(newline="") as f:
        return {row["dataset"]: float(row["T"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def raw_rows() -> list[dict[str, str]]:
    with CURVES.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER
        return list(reader)


@pytest.fixture(scope="module")
def curves(raw_rows) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in raw_rows:
        out.setdefault(row["dataset"], []).append({
            "point": int(row["point"]),
            "value": float(row["transferability"]),
            "text": row["transferability"],
            "source": row["source"],
            "precision": float(row["precision"]),
        })
    return out


def _mean(points: list[dict]) -> float:
    return sum(p["value"] for p in points[:N_POINTS - 1]) / (N_POINTS - 1)


def test_shape_and_order(raw_rows, curves, table):
    assert len(raw_rows) == 12 * N_POINTS
    assert list(curves) == list(table), "same data sets, same spelling and order as paper_table.csv"
    for name, points in curves.items():
        assert [p["point"] for p in points] == list(range(1, N_POINTS + 1)), name


def test_values_and_precision(curves):
    for name, points in curves.items():
        for p in points:
            assert math.isfinite(p["value"]) and p["value"] > 0, (name, p)
            assert math.isfinite(p["precision"]) and p["precision"] > 0, (name, p)
        head = points[-1]
        assert head["value"] == 1.0, name
        assert head["source"] in {"definition", "printed"}, name


def test_cifar10_is_the_printout(curves):
    points = curves["CIFAR-10"]
    assert [p["value"] for p in points] == PRINTED_CIFAR10
    assert {p["source"] for p in points} == {"printed"}
    assert {p["precision"] for p in points} == {0.005}


def test_digitised_panels(curves):
    for name, points in curves.items():
        if name == "CIFAR-10":
            continue
        assert [p["source"] for p in points] == ["digitised"] * 17 + ["definition"], name
        precisions = {p["precision"] for p in points[:-1]}
        assert len(precisions) == 1, f"{name}: one precision per panel"
        precision = precisions.pop()
        # the values are rounded to (at most) about a tenth of the precision
        decimals = {len(p["text"].partition(".")[2]) for p in points[:-1]}
        assert len(decimals) == 1, name
        assert 10.0 ** -decimals.pop() <= precision / 5, name


@pytest.mark.parametrize("name", ["CIFAR-10", "CIFAR-100", "Caltech-101", "CUB-200", "Flowers",
                                  "Land-Use", "POCUS", "DTD", "DomainNet-r", "DomainNet-p",
                                  "DomainNet-c"])
def test_mean_matches_published_T(curves, table, name):
    points = curves[name]
    published = table[name]
    precision = points[0]["precision"]
    tolerance = min(precision, 0.005 * published) + 0.005
    assert abs(_mean(points) - published) <= tolerance, (name, _mean(points), published)


def test_aircraft_panel_disagrees_with_published_T(curves, table):
    points = curves["Aircraft"]
    assert abs(_mean(points) - AIRCRAFT_FIGURE_MEAN) <= points[0]["precision"]
    assert _mean(points) / table["Aircraft"] > 1.2
