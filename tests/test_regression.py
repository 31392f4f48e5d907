"""The Section 3 regression (metrics/regression.py): ln T = a G + b D + c ln N + d.

The library's numbers are checked against computations written here from scratch (a
least-squares solve, the textbook standard errors, Student's t), against a synthetic table
whose exact coefficients are known, and against the paper's published equation, which the
published table does not reproduce (recorded below so that nobody tunes the fit to it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api
from scipy import stats

from metrics.regression import (
    RegressionFit,
    fit_log_transferability,
    fit_to_dict,
    format_fit,
    partial_regression_figure,
    partial_residuals,
    read_table,
)
from utils import UserError

TABLE = Path(__file__).resolve().parents[1] / "data" / "paper_table.csv"
TERMS = ["G", "D", "log_N", "intercept"]
PAPER_DATASETS = ["CIFAR-10", "CIFAR-100", "Caltech-101", "CUB-200", "Aircraft", "Flowers",
                  "Land-Use", "POCUS", "DTD", "DomainNet-r", "DomainNet-p", "DomainNet-c"]
# The paper's ResNet-50 equation: ln T = -0.26 G + 0.32 D - 0.61 ln N + 2.86.
PUBLISHED_RESNET50 = {"G": -0.26, "D": 0.32, "log_N": -0.61, "intercept": 2.86}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return read_table(TABLE)


@pytest.fixture(scope="module")
def fit(rows) -> RegressionFit:
    return fit_log_transferability(rows)


def design(rows, log=np.log) -> tuple[np.ndarray, np.ndarray]:
    """[G, D, log N, 1] and log T, built independently of the library."""
    x = np.array([[r["G"], r["D"], log(r["N"]), 1.0] for r in rows])
    y = np.array([log(r["T"]) for r in rows])
    return x, y


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def synthetic_rows(n: int = 8) -> list[dict]:
    """Rows lying exactly on ln T = 0.5 G - 0.2 D + 1.5 ln N + 0.1 (no noise)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        g, d, size = rng.uniform(0, 3), rng.uniform(0, 2), float(rng.integers(100, 100_000))
        t = math.exp(0.5 * g - 0.2 * d + 1.5 * math.log(size) + 0.1)
        out.append({"dataset": f"syn{i}", "G": g, "D": d, "N": size, "T": t})
    return out


# ---------------------------------------------------------------------------- the table


def test_shipped_table_matches_the_paper(rows):
    assert [r["dataset"] for r in rows] == PAPER_DATASETS
    assert set(rows[0]) == {"dataset", "G", "D", "N", "T"}
    by_name = {r["dataset"]: r for r in rows}
    assert by_name["CIFAR-10"] == {"dataset": "CIFAR-10", "G": 2.27, "D": 0.665, "N": 50000, "T": 7.79}
    assert by_name["Flowers"]["T"] == 106.30 and by_name["Flowers"]["N"] == 1088
    assert by_name["POCUS"]["G"] == 13.12 and by_name["POCUS"]["D"] == 1.2
    assert by_name["DomainNet-c"]["D"] == 823.2 and by_name["DomainNet-c"]["N"] == 33525
    assert by_name["DomainNet-r"]["N"] == 120906 and by_name["DomainNet-r"]["G"] == 0.027
    # N is written as plain integers in the file
    lines = TABLE.read_text().splitlines()
    assert lines[0] == "dataset,G,D,N,T"
    assert all(line.split(",")[3].isdigit() for line in lines[1:])


def test_extra_columns_are_ignored(tmp_path):
    text = TABLE.read_text().splitlines()
    extended = [text[0] + ",note"] + [line + ",x" for line in text[1:]]
    path = write_csv(tmp_path / "extra.csv", "\n".join(extended) + "\n")
    assert read_table(path) == read_table(TABLE)


# ------------------------------------------------------------- agreement with independent math


def test_coefficients_equal_an_independent_least_squares_solve(rows, fit):
    x, y = design(rows)
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    for term, expected in zip(TERMS, beta):
        assert fit.coefficients[term] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert fit.n == 12


def test_inference_equals_the_textbook_formulas(rows, fit):
    x, y = design(rows)
    n, k = x.shape
    beta = np.linalg.solve(x.T @ x, x.T @ y)
    resid = y - x @ beta
    sigma2 = resid @ resid / (n - k)
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
    t = beta / se
    p = 2 * stats.t.sf(np.abs(t), n - k)
    r2 = 1 - resid @ resid / np.sum((y - y.mean()) ** 2)
    for i, term in enumerate(TERMS):
        assert fit.std_errors[term] == pytest.approx(se[i], rel=1e-9)
        assert fit.t_values[term] == pytest.approx(t[i], rel=1e-9)
        assert fit.p_values[term] == pytest.approx(p[i], rel=1e-7)
    assert fit.r2 == pytest.approx(r2, rel=1e-12)
    assert fit.adj_r2 == pytest.approx(1 - (1 - r2) * (n - 1) / (n - k), rel=1e-12)


def test_the_fit_is_made_by_statsmodels_ols(rows, monkeypatch):
    class Refused(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Refused("statsmodels.api.OLS was called")

    monkeypatch.setattr(statsmodels.api, "OLS", refuse)
    with pytest.raises(Refused):
        fit_log_transferability(rows)


def test_synthetic_table_recovers_known_coefficients():
    fit = fit_log_transferability(synthetic_rows(8))
    expected = {"G": 0.5, "D": -0.2, "log_N": 1.5, "intercept": 0.1}
    for term, value in expected.items():
        assert fit.coefficients[term] == pytest.approx(value, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.n == 8


def test_standardised_fit_rescales_the_raw_coefficients(rows, fit):
    x, _ = design(rows)
    std = x[:, :3].std(axis=0, ddof=1)
    z = fit.standardized
    assert z is not None and z.standardized is None
    for i, term in enumerate(["G", "D", "log_N"]):
        assert z.coefficients[term] == pytest.approx(fit.coefficients[term] * std[i], rel=1e-9)
        assert z.t_values[term] == pytest.approx(fit.t_values[term], rel=1e-9)  # scale-free
        assert z.p_values[term] == pytest.approx(fit.p_values[term], rel=1e-9)
    # with centred predictors the intercept is the mean of ln T
    assert z.coefficients["intercept"] == pytest.approx(np.mean([math.log(r["T"]) for r in rows]), rel=1e-9)
    assert z.r2 == pytest.approx(fit.r2, rel=1e-12)
    assert z.adj_r2 == pytest.approx(fit.adj_r2, rel=1e-12)
    assert z.n == fit.n


@pytest.mark.parametrize("predictor", ["G", "D", "log_N"])
def test_partial_regression_slope_is_the_coefficient(rows, fit, predictor):
    x_resid, y_resid = partial_residuals(rows, predictor)
    assert len(x_resid) == len(y_resid) == 12
    # residuals of a regression with a constant have mean zero, so the slope through the origin
    # is the ordinary least-squares slope (Frisch-Waugh-Lovell)
    assert abs(x_resid.mean()) < 1e-9 * max(1.0, np.abs(x_resid).max())
    slope = float(x_resid @ y_resid / (x_resid @ x_resid))
    assert slope == pytest.approx(fit.coefficients[predictor], rel=1e-8)
    # and not trivially: the simple (marginal) slope of ln T on the predictor differs
    x, y = design(rows)
    column = x[:, ["G", "D", "log_N"].index(predictor)]
    marginal = np.polyfit(column, y, 1)[0]
    assert marginal != pytest.approx(fit.coefficients[predictor], rel=1e-3)


# ---------------------------------------------------------------------------- reporting


def test_fit_to_dict_is_plain_json(fit):
    data = fit_to_dict(fit)
    assert set(data) >= {"coefficients", "std_errors", "p_values", "r2", "adj_r2", "n", "standardized"}
    assert set(data["standardized"]) >= {"coefficients", "std_errors", "p_values", "r2", "adj_r2", "n"}
    assert "standardized" not in data["standardized"]
    for block in (data, data["standardized"]):
        for key in ("coefficients", "std_errors", "p_values"):
            assert list(block[key]) == TERMS
            assert all(type(v) is float for v in block[key].values())
        assert type(block["r2"]) is float and type(block["adj_r2"]) is float and type(block["n"]) is int
    assert json.loads(json.dumps(data)) == data
    assert data["coefficients"]["log_N"] == fit.coefficients["log_N"]


def test_format_fit_shows_the_table_and_the_equation(fit):
    text = format_fit(fit, "ResNet-50")
    assert text.splitlines()[0] == "ResNet-50"
    c = fit.coefficients
    equation = (f"ln T = {c['G']:.2f} G + {c['D']:.2f} D - {abs(c['log_N']):.2f} ln N "
                f"+ {c['intercept']:.2f}")
    assert equation in text  # on this table G, D > 0 and ln N < 0
    assert f"{fit.std_errors['log_N']:.4f}" in text
    assert f"{fit.standardized.coefficients['log_N']:.4f}" in text
    assert f"R^2 = {fit.r2:.4f}" in text and "n = 12" in text
    # signs are written as operators, never "+ -"
    assert "+ -" not in text and "- -" not in text


def test_format_fit_writes_negative_terms_with_a_minus():
    rows = [dict(r, T=r["T"] ** -1) for r in synthetic_rows(8)]  # negates every coefficient
    text = format_fit(fit_log_transferability(rows), "negated")
    assert "ln T = -0.50 G + 0.20 D - 1.50 ln N - 0.10" in text


def test_partial_regression_figure_is_a_png(rows, fit):
    data = partial_regression_figure(rows, fit)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    svg = partial_regression_figure(rows, fit, fmt="svg")
    assert b"<svg" in svg[:1000]


# ---------------------------------------------------------------------------- table errors


GOOD_ROWS = TABLE.read_text().splitlines()[1:]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.csv: no such file"):
        read_table(tmp_path / "nowhere.csv")


def test_missing_columns_are_named(tmp_path):
    body = "\n".join(",".join(line.split(",")[:3]) for line in GOOD_ROWS)
    path = write_csv(tmp_path / "cols.csv", "dataset,G,D\n" + body + "\n")
    with pytest.raises(UserError) as err:
        read_table(path)
    message = str(err.value)
    assert "cols.csv" in message and "N, T" in message and "\n" not in message


def test_column_names_are_case_sensitive(tmp_path):
    path = write_csv(tmp_path / "case.csv", "dataset,g,D,N,T\n" + "\n".join(GOOD_ROWS) + "\n")
    with pytest.raises(UserError, match=r"case\.csv: missing column\(s\) G;"):
        read_table(path)


def test_non_numeric_value_names_row_and_column(tmp_path):
    lines = list(GOOD_ROWS)
    lines[2] = "Caltech-101,0.63,abc,3060,23.92"  # third data row: line 4 of the file
    path = write_csv(tmp_path / "text.csv", "dataset,G,D,N,T\n" + "\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        read_table(path)
    message = str(err.value)
    assert "text.csv" in message and "line 4" in message and "Caltech-101" in message
    assert "column D" in message and "'abc'" in message


@pytest.mark.parametrize("column, index", [("T", 4), ("N", 3)])
@pytest.mark.parametrize("value", ["0", "-1.5"])
def test_non_positive_t_or_n(tmp_path, column, index, value):
    lines = list(GOOD_ROWS)
    fields = lines[5].split(",")  # Flowers, line 7
    fields[index] = value
    lines[5] = ",".join(fields)
    path = write_csv(tmp_path / "neg.csv", "dataset,G,D,N,T\n" + "\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        read_table(path)
    message = str(err.value)
    assert "neg.csv" in message and "line 7" in message and f"column {column}" in message
    assert "not positive" in message


def test_too_few_rows(tmp_path):
    path = write_csv(tmp_path / "four.csv", "dataset,G,D,N,T\n" + "\n".join(GOOD_ROWS[:4]) + "\n")
    with pytest.raises(UserError, match=r"four\.csv: 4 data row\(s\).*at least 5"):
        read_table(path)
    path = write_csv(tmp_path / "five.csv", "dataset,G,D,N,T\n" + "\n".join(GOOD_ROWS[:5]) + "\n")
    assert len(read_table(path)) == 5


def test_empty_file_reports_missing_columns(tmp_path):
    path = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(UserError, match=r"empty\.csv: missing column\(s\) dataset, G, D, N, T"):
        read_table(path)


def test_collinear_predictors_are_a_user_error():
    rows = [dict(r, G=1.0) for r in synthetic_rows(8)]  # G constant: collinear with the intercept
    with pytest.raises(UserError, match="collinear"):
        fit_log_transferability(rows)


# ------------------------------------------------------- the published equation is not the fit


def test_published_resnet50_equation_is_not_what_ols_on_the_published_table_gives(rows, fit):
    """The paper prints ln T = -0.26 G + 0.32 D - 0.61 ln N + 2.86 for ResNet-50. OLS on the
    paper's own table (measured here, statsmodels 0.15) gives instead

        raw, ln:            G +0.0244 (p 0.51)  D +0.00041 (p 0.46)  ln N -0.5415 (p 0.0002)  +7.6645, R^2 0.881
        standardised, ln:   G +0.0867           D +0.1135            ln N -0.9130              +2.8376
        raw, log10:         G +0.0106           D +0.00018           log10 N -0.5415           +3.3286
        no DomainNet, ln:   G -0.0516 (p 0.43)  D +0.9467 (p 0.18)   ln N -0.5663 (p 0.0016)  +7.7588, R^2 0.903
        no DomainNet, log10:G -0.0224           D +0.4111            log10 N -0.5663           +3.3696
        no DomainNet, ln, standardised: G -0.1989  D +0.3623  ln N -0.8159  +3.1175

    With all twelve rows the G coefficient is positive in every variant, and only the
    standardised intercept (the mean of ln T, 2.84) comes near a published number. The
    closest variant, standardised without DomainNet, has the published signs but misses by
    0.06 / 0.04 / 0.21 / 0.26. None reproduces the published four coefficients, so the fit
    must not be tuned towards them.
    """
    assert fit.coefficients["G"] == pytest.approx(0.0244, abs=5e-4)
    assert fit.coefficients["D"] == pytest.approx(0.00041, abs=5e-5)
    assert fit.coefficients["log_N"] == pytest.approx(-0.5415, abs=5e-4)
    assert fit.coefficients["intercept"] == pytest.approx(7.6645, abs=5e-4)
    assert fit.r2 == pytest.approx(0.8813, abs=5e-4)
    assert abs(fit.coefficients["G"] - PUBLISHED_RESNET50["G"]) > 0.05

    without_domainnet = [r for r in rows if not r["dataset"].startswith("DomainNet")]
    assert len(without_domainnet) == 9
    variants = {
        "ln": fit,
        "ln, standardised": fit.standardized,
        "log10": fit_log_transferability(rows, log=math.log10),
        "ln, no DomainNet": fit_log_transferability(without_domainnet),
        "log10, no DomainNet": fit_log_transferability(without_domainnet, log=math.log10),
    }
    variants["ln, no DomainNet, standardised"] = variants["ln, no DomainNet"].standardized
    variants["log10, standardised"] = variants["log10"].standardized
    assert variants["ln, no DomainNet"].coefficients["G"] == pytest.approx(-0.0516, abs=5e-4)
    assert variants["ln, no DomainNet"].coefficients["D"] == pytest.approx(0.9467, abs=5e-4)
    assert variants["log10"].coefficients["intercept"] == pytest.approx(3.3286, abs=5e-4)
    closest = variants["ln, no DomainNet, standardised"].coefficients
    assert [round(closest[t], 4) for t in TERMS] == [-0.1989, 0.3623, -0.8159, 3.1175]
    for name, variant in variants.items():
        matches = all(abs(variant.coefficients[t] - PUBLISHED_RESNET50[t]) <= 0.02 for t in TERMS)
        assert not matches, f"{name} reproduces the published equation: {variant.coefficients}"
