"""The paper's Section 3 regression: how transferability depends on the downstream data set.

Over a table of data sets, each with a domain gap ``G``, an intraclass variance ``D``, a
training-set size ``N`` and a measured transferability ``T``, ordinary least squares fits

    ln T = a G + b D + c ln N + d

Standard errors, t values, p values and R^2 come from statsmodels' OLS. The same model is
also fitted with ``G``, ``D`` and ``ln N`` standardised (mean 0, sample standard deviation
1), so that the three effects can be compared on one scale; ``ln T`` is left as it is.

The paper's finding 1 (domain gap has a smaller effect than intraclass variance and data
amount) is judged on that scale by :func:`finding1`: a Wald test of each difference of
absolute standardised coefficients, ``|beta_G| - |beta_D|`` and ``|beta_G| - |beta_logN|``
(:func:`compare_effects`).

Everything here is a pure function (rows in, numbers, text or image bytes out); reading the
table is the only I/O, and its problems are reported as :class:`utils.UserError`.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import statsmodels.api as sm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from statsmodels.graphics.regressionplots import plot_partregress

from plotting import plain_text
from utils import UserError, check_input_file

# The table's columns the regression needs; any others are ignored.
TABLE_COLUMNS = ("dataset", "G", "D", "N", "T")
NUMERIC_COLUMNS = ("G", "D", "N", "T")
# Terms of the model in design-matrix order (the constant is the last column).
TERMS = ("G", "D", "log_N", "intercept")
PREDICTORS = TERMS[:3]
MIN_ROWS = len(TERMS) + 1  # at least one residual degree of freedom
SIGNIFICANCE = 0.05  # the level of finding 1's comparisons

# The paper's published ResNet-50 equation, ln T = -0.26 G + 0.32 D - 0.61 ln N + 2.86 (which
# OLS on the paper's own table does not reproduce; see docs/analysis.md). All four of its
# equations are in data/paper_regressions.csv (published_regressions()).
PUBLISHED_RESNET50 = {"G": -0.26, "D": 0.32, "log_N": -0.61, "intercept": 2.86}
PUBLISHED_REGRESSIONS = Path(__file__).resolve().parents[1] / "data" / "paper_regressions.csv"
FINDING1_CLAIM = ("Domain gap has a smaller effect on transferability than the downstream intraclass "
                  "variance and data amount.")

Row = Mapping[str, object]


def published_regressions(path: str | Path = PUBLISHED_REGRESSIONS) -> dict[str, dict[str, float]]:
    """The paper's equations by network (``ResNet-50``, ``ResNet-34``, ``DenseNet-121``,
    ``ViT-small``): term (``G``, ``D``, ``log_N``, ``intercept``) -> coefficient."""
    with open(path, newline="") as handle:
        return {row["architecture"]: {term: float(row[term]) for term in TERMS} for row in csv.DictReader(handle)}


# ---------------------------------------------------------------------------- reading


def read_table(path: str | Path) -> list[dict]:
    """Read a CSV with (at least) the columns ``dataset, G, D, N, T``.

    Returns one dict per data row with exactly those keys: ``dataset`` a string, the
    others floats. Raises :class:`UserError` (one line naming the file) for a missing or
    unreadable file, missing columns, a value that is not a finite number, ``T <= 0`` or
    ``N <= 0`` (their logarithms are undefined), and fewer than 5 rows.
    """
    path = check_input_file(path, "a CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            twice = next((name for i, name in enumerate(header) if name and name in header[:i]), None)
            if twice is not None:
                columns = [str(i + 1) for i, name in enumerate(header) if name == twice]
                raise UserError(f"{path}: the column {twice!r} appears more than once (columns "
                                f"{', '.join(columns)}); which one to fit is unclear: rename or remove the others")
            missing = [name for name in TABLE_COLUMNS if name not in header]
            if missing:
                raise UserError(
                    f"{path}: missing column(s) {', '.join(missing)}; the table needs the columns "
                    f"{', '.join(TABLE_COLUMNS)} (names are case-sensitive)"
                )
            reader.fieldnames = header
            rows = [_parse_row(path, reader.line_num, raw) for raw in reader]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise UserError(f"{path}: not a readable CSV file ({err})") from None
    except PermissionError:
        raise UserError(f"{path}: cannot be read (permission denied)") from None
    if len(rows) < MIN_ROWS:
        raise UserError(
            f"{path}: {len(rows)} data row(s); the fit has {len(TERMS)} parameters "
            f"(G, D, ln N, intercept) and needs at least {MIN_ROWS} rows"
        )
    return rows


# By hand, not pandas.read_csv: a bad value must be a UserError naming its line and column.
def _parse_row(path: Path, line: int, raw: Mapping[str, str | None]) -> dict:
    name = (raw.get("dataset") or "").strip()
    where = f"{path}: line {line}" + (f" ({name})" if name else "")
    row: dict = {"dataset": name}
    for column in NUMERIC_COLUMNS:
        text = (raw.get(column) or "").strip()
        if not text:
            raise UserError(f"{where}, column {column}: the value is empty")
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"{where}, column {column}: {text!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{where}, column {column}: {text!r} is not a finite number")
        if column in ("N", "T") and value <= 0:
            raise UserError(
                f"{where}, column {column}: {text} is not positive, so ln {column} is undefined"
            )
        row[column] = value
    return row


# ---------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class RegressionFit:
    """One OLS fit of ``log T`` on ``G``, ``D`` and ``log N``.

    Each of ``coefficients``, ``std_errors``, ``t_values`` and ``p_values`` maps the
    keys ``G``, ``D``, ``log_N`` and ``intercept`` to a float. ``standardized`` is the same
    fit with the three predictors standardised (its own ``standardized`` is ``None``).
    ``log_label`` names the logarithm used (``ln`` for the natural one). ``covariance`` is
    the OLS covariance matrix of the coefficients, ``covariance[a][b]`` for two terms (its
    diagonal is the square of ``std_errors``), and ``df_resid`` the residual degrees of
    freedom, ``n`` minus the 4 parameters.
    """

    coefficients: dict[str, float]
    std_errors: dict[str, float]
    t_values: dict[str, float]
    p_values: dict[str, float]
    r2: float
    adj_r2: float
    n: int
    standardized: RegressionFit | None = None
    log_label: str = "ln"
    covariance: dict[str, dict[str, float]] | None = None
    df_resid: int | None = None


def _log_label(log: Callable[[float], float]) -> str:
    if log in (math.log, np.log):
        return "ln"
    return getattr(log, "__name__", "log")


def _check_rows(rows: Sequence[Row]) -> None:
    """The checks :func:`read_table` makes, for rows built in code."""
    if len(rows) < MIN_ROWS:
        raise UserError(
            f"{len(rows)} data set(s) given; the fit has {len(TERMS)} parameters and needs at "
            f"least {MIN_ROWS} data sets"
        )
    for row in rows:
        for column in NUMERIC_COLUMNS:
            value = float(row[column])  # type: ignore[arg-type]
            if not math.isfinite(value):
                raise UserError(f"data set {row.get('dataset')!r}: {column} = {value} is not finite")
            if column in ("N", "T") and value <= 0:
                raise UserError(
                    f"data set {row.get('dataset')!r}: {column} = {value} is not positive, "
                    f"so ln {column} is undefined"
                )


def _design(rows: Sequence[Row], log: Callable[[float], float]) -> tuple[np.ndarray, np.ndarray]:
    """Predictor columns ``G, D, log N`` (no constant) and the response ``log T``."""
    predictors = np.array(
        [[float(r["G"]), float(r["D"]), log(float(r["N"]))] for r in rows], dtype=np.float64
    )
    response = np.array([log(float(r["T"])) for r in rows], dtype=np.float64)
    return predictors, response


def _ols(predictors: np.ndarray, response: np.ndarray, log_label: str) -> RegressionFit:
    # Not the formula interface (smf.ols): its design matrix is Fortran-ordered, which changes the
    # rounding, e.g. an exact fit's noise-level standard errors, against this C-ordered one.
    design = np.column_stack([predictors, np.ones(len(response))])
    # statsmodels' pinv fit never refuses a rank-deficient design; the user must hear of it.
    rank = np.linalg.matrix_rank(design)
    if rank < design.shape[1]:
        raise UserError(
            f"the predictors G, D and {log_label} N are collinear over these data sets "
            f"(design rank {rank} of {design.shape[1]}, e.g. a predictor that is the same for "
            "every data set); the coefficients are not identifiable"
        )
    result = sm.OLS(response, design).fit()

    def by_term(values: np.ndarray) -> dict[str, float]:
        return {term: float(value) for term, value in zip(TERMS, np.asarray(values))}

    covariance = np.asarray(result.cov_params())

    return RegressionFit(
        coefficients=by_term(result.params),
        std_errors=by_term(result.bse),
        t_values=by_term(result.tvalues),
        p_values=by_term(result.pvalues),
        r2=float(result.rsquared),
        adj_r2=float(result.rsquared_adj),
        n=int(result.nobs),
        standardized=None,
        log_label=log_label,
        covariance={term: by_term(row) for term, row in zip(TERMS, covariance)},
        df_resid=int(round(result.df_resid)),
    )


def fit_log_transferability(
    rows: Sequence[Row], log: Callable[[float], float] = math.log
) -> RegressionFit:
    """Fit ``log T = a G + b D + c log N + d`` by OLS over ``rows`` (dicts with the keys
    ``G``, ``D``, ``N``, ``T``), raw and with the three predictors standardised (mean 0,
    sample standard deviation 1).

    ``log`` is applied to both ``T`` and ``N``; the default is the natural logarithm.
    """
    _check_rows(rows)
    label = _log_label(log)
    predictors, response = _design(rows, log)
    raw = _ols(predictors, response, label)
    # z-scores by hand: scipy.stats.zscore rounds differently in the last bits, and published fits must not move
    scaled = (predictors - predictors.mean(axis=0)) / predictors.std(axis=0, ddof=1)
    return replace(raw, standardized=_ols(scaled, response, label))


def _partial_design(
    rows: Sequence[Row], predictor: str, log: Callable[[float], float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``log T``, the ``predictor`` column and the other two predictors with a constant."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, not {predictor!r}")
    predictors, response = _design(rows, log)
    index = PREDICTORS.index(predictor)
    others = np.column_stack([np.delete(predictors, index, axis=1), np.ones(len(response))])
    return response, predictors[:, index], others


def partial_residuals(
    rows: Sequence[Row], predictor: str, log: Callable[[float], float] = math.log
) -> tuple[np.ndarray, np.ndarray]:
    """The data of an added-variable plot for ``predictor`` (``G``, ``D`` or ``log_N``).

    Returns ``(x_resid, y_resid)``: the residuals of the predictor and of ``log T``, each
    regressed by least squares on the other two predictors and a constant (as statsmodels'
    ``plot_partregress`` computes them). By the Frisch-Waugh-Lovell theorem the least-squares
    slope of ``y_resid`` on ``x_resid`` is the predictor's coefficient in the multiple
    regression.
    """
    response, column, others = _partial_design(rows, predictor, log)
    return sm.OLS(column, others).fit().resid, sm.OLS(response, others).fit().resid


# ---------------------------------------------------------------------------- finding 1


@dataclass(frozen=True)
class EffectComparison:
    """A Wald test of ``|beta_G| - |beta_other|`` in the standardised fit.

    With ``s_x`` the sign of ``beta_x`` (+1 for 0), the contrast ``c = s_G e_G - s_other
    e_other`` gives ``difference = c' beta = |beta_G| - |beta_other|`` and ``std_error =
    sqrt(c' V c)`` (``V`` the OLS covariance of the coefficients); ``t = difference /
    std_error`` and ``p`` is its two-sided p value from Student's t with ``df`` (the residual
    degrees of freedom): what statsmodels' ``result.t_test(c)`` gives. The signs are taken
    as they were fitted, so the test reads as a comparison of magnitudes only while both
    coefficients are clearly away from 0 (near 0, ``|beta|`` is not smooth and the p value is
    approximate).
    """

    other: str  # "D" or "log_N"
    difference: float  # |beta_G| - |beta_other|; negative: G's effect is the smaller
    std_error: float
    t: float
    p: float
    df: int

    def outcome(self, alpha: float = SIGNIFICANCE) -> str:
        """``smaller`` / ``larger`` (G's effect than the other's, at level ``alpha``) or
        ``undetermined``."""
        if self.p < alpha and self.difference < 0:
            return "smaller"
        if self.p < alpha and self.difference > 0:
            return "larger"
        return "undetermined"

    def as_dict(self, alpha: float = SIGNIFICANCE) -> dict:
        """The fields and ``outcome`` (at ``alpha``), as plain JSON-serialisable values."""
        return {"other": self.other, "difference": float(self.difference), "std_error": float(self.std_error),
                "t": float(self.t), "p": float(self.p), "df": int(self.df), "outcome": self.outcome(alpha)}


def _standardized(fit: RegressionFit) -> RegressionFit:
    if fit.standardized is None or fit.standardized.covariance is None or fit.standardized.df_resid is None:
        raise ValueError("the comparison needs a fit from fit_log_transferability (with its standardised fit "
                         "and covariance)")
    return fit.standardized


def compare_effects(fit: RegressionFit, other: str) -> EffectComparison:
    """Compare the magnitude of G's standardised coefficient with that of ``other`` (``D`` or
    ``log_N``) in ``fit.standardized`` by a Wald test (see :class:`EffectComparison`).
    ``fit`` is what :func:`fit_log_transferability` returns."""
    from scipy import stats

    if other not in PREDICTORS[1:]:
        raise ValueError(f"other must be one of {', '.join(PREDICTORS[1:])}, not {other!r}")
    std = _standardized(fit)
    beta = std.coefficients
    contrast = {term: 0.0 for term in TERMS}
    contrast["G"] = 1.0 if beta["G"] >= 0 else -1.0
    contrast[other] = -1.0 if beta[other] >= 0 else 1.0
    difference = sum(contrast[term] * beta[term] for term in TERMS)
    variance = sum(contrast[a] * std.covariance[a][b] * contrast[b] for a in TERMS for b in TERMS)
    se = math.sqrt(max(variance, 0.0))
    df = int(std.df_resid)
    if se > 0:
        t = difference / se
    else:  # an exact fit: no residual variance
        t = 0.0 if difference == 0 else math.copysign(math.inf, difference)
    p = float(2 * stats.t.sf(abs(t), df))
    return EffectComparison(other, float(difference), float(se), float(t), p, df)


def sign_differences(fit: RegressionFit, published: Mapping[str, float] = PUBLISHED_RESNET50) -> list[str]:
    """The predictors (of ``G``, ``D``, ``log_N``, in that order) whose fitted coefficient has
    another sign than in ``published`` (by default the paper's ResNet-50 equation). Raw and
    standardised coefficients have the same signs; a coefficient of exactly 0 differs from
    any non-zero published one."""
    def sign(value: float) -> int:
        return (value > 0) - (value < 0)

    return [term for term in PREDICTORS if sign(fit.coefficients[term]) != sign(published[term])]


def _p_text(p: float) -> str:
    return f"{p:.2g}"


def _sign_text(value: float) -> str:
    return "+" if value > 0 else "-" if value < 0 else "0"


def finding1(fit: RegressionFit, alpha: float = SIGNIFICANCE) -> dict:
    """The verdict on "domain gap has a smaller effect on transferability than intraclass
    variance and data amount" from the standardised fit of ``fit``:

    * ``supported`` when G's effect is smaller than each of D's and ln N's (both
      :func:`compare_effects` differences negative with p < ``alpha``);
    * ``contradicted`` when it is larger than either (a positive difference with p < ``alpha``);
    * ``undetermined`` otherwise; the evidence names the comparison(s) that decide nothing.

    Returns ``{"claim", "verdict", "evidence", "comparisons", "sign_differences"}``:
    ``comparisons`` holds :meth:`EffectComparison.as_dict` of the two tests (G vs D, G vs
    log_N), ``sign_differences`` the predictors whose fitted sign is not the one of the
    paper's ResNet-50 equation (:data:`PUBLISHED_RESNET50`).
    """
    std = _standardized(fit)
    comparisons = [compare_effects(fit, other) for other in PREDICTORS[1:]]
    outcomes = [c.outcome(alpha) for c in comparisons]
    if "larger" in outcomes:
        verdict = "contradicted"
    elif all(outcome == "smaller" for outcome in outcomes):
        verdict = "supported"
    else:
        verdict = "undetermined"

    def label(term: str) -> str:
        return _term_label(term, std.log_label, standardized=True)

    tests = "; ".join(
        f"|{label('G')}| vs |{label(c.other)}|: difference {c.difference:+.3f} (se {c.std_error:.3f}), "
        f"p = {_p_text(c.p)} ({outcome})" for c, outcome in zip(comparisons, outcomes))
    coefficients = ", ".join(f"{label(term)} {std.coefficients[term]:+.3f} (p = {_p_text(std.p_values[term])})"
                             for term in PREDICTORS)
    differing = sign_differences(std)
    if differing:
        signs = "signs differing from the paper's ResNet-50 equation: " + ", ".join(
            f"{_term_label(term, std.log_label, False)} ({_sign_text(std.coefficients[term])} here, "
            f"{_sign_text(PUBLISHED_RESNET50[term])} published)" for term in differing)
    else:
        signs = "every sign as in the paper's ResNet-50 equation"
    evidence = (f"{tests}; standardised coefficients of {std.log_label} T: {coefficients}; {signs}; "
                f"R^2 = {std.r2:.2f}, n = {std.n}")
    return {"claim": FINDING1_CLAIM, "verdict": verdict, "evidence": evidence,
            "comparisons": [c.as_dict(alpha) for c in comparisons], "sign_differences": differing}


def format_finding1(verdict: Mapping[str, object], log_label: str = "ln") -> str:
    """:func:`finding1`'s result as a few readable lines (the comparisons, then the verdict)."""
    lines = ["Finding 1: " + str(verdict["claim"])]
    for c in verdict["comparisons"]:  # type: ignore[union-attr]
        other = _term_label(c["other"], log_label, standardized=True)
        lines.append(f"  |z(G)| - |{other}|".ljust(22) + f"= {c['difference']:+.4f}   std err {c['std_error']:.4f}"
                     f"   t {c['t']:+.3f}   p {_format_p(c['p'])}   df {c['df']}   {c['outcome']}")
    if verdict.get("sign_differences"):
        lines.append("  signs unlike the paper's ResNet-50 equation: "
                     + ", ".join(_term_label(t, log_label, False) for t in verdict["sign_differences"]))  # type: ignore[union-attr]
    lines.append(f"  verdict: {verdict['verdict']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- reporting


def fit_to_dict(fit: RegressionFit) -> dict:
    """The fit as plain JSON-serialisable Python values."""
    out: dict = {
        "coefficients": dict(fit.coefficients),
        "std_errors": dict(fit.std_errors),
        "t_values": dict(fit.t_values),
        "p_values": dict(fit.p_values),
        "r2": float(fit.r2),
        "adj_r2": float(fit.adj_r2),
        "n": int(fit.n),
    }
    if fit.covariance is not None:
        out["covariance"] = {term: dict(row) for term, row in fit.covariance.items()}
    if fit.df_resid is not None:
        out["df_resid"] = int(fit.df_resid)
    if fit.standardized is not None:
        out["standardized"] = fit_to_dict(fit.standardized)
    return out


def _term_label(term: str, log_label: str, standardized: bool) -> str:
    name = f"{log_label} N" if term == "log_N" else term
    return f"z({name})" if standardized and term != "intercept" else name


def format_equation(fit: RegressionFit, standardized: bool = False, digits: int = 2) -> str:
    """The fitted model as text, e.g. ``ln T = -0.26 G + 0.32 D - 0.61 ln N + 2.86``."""
    parts: list[str] = []
    for term in TERMS:
        value = round(fit.coefficients[term], digits) + 0.0  # + 0.0: no "-0.00"
        magnitude = f"{abs(value):.{digits}f}"
        label = "" if term == "intercept" else " " + _term_label(term, fit.log_label, standardized)
        if not parts:
            parts.append(f"{'-' if value < 0 else ''}{magnitude}{label}")
        else:
            parts.append(f" {'-' if value < 0 else '+'} {magnitude}{label}")
    return f"{fit.log_label} T = " + "".join(parts)


def _format_p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


# By hand, not statsmodels' summary(): that has neither the standardised fit nor the equation.
def _format_block(fit: RegressionFit, heading: str, standardized: bool) -> list[str]:
    lines = [heading, f"  {'term':<12}{'coef':>10}{'std err':>10}{'t':>9}{'p':>10}"]
    for term in TERMS:
        lines.append(
            f"  {_term_label(term, fit.log_label, standardized):<12}"
            f"{fit.coefficients[term]:>10.4f}{fit.std_errors[term]:>10.4f}"
            f"{fit.t_values[term]:>9.3f}{_format_p(fit.p_values[term]):>10}"
        )
    lines.append(f"  R^2 = {fit.r2:.4f}   adjusted R^2 = {fit.adj_r2:.4f}   n = {fit.n}")
    lines.append(f"  {format_equation(fit, standardized)}")
    return lines


def format_fit(fit: RegressionFit, title: str) -> str:
    """A readable report: coefficient table, R^2 and equation, raw and standardised."""
    lines = [title, "=" * len(title)]
    lines += _format_block(fit, f"Raw predictors ({fit.log_label} T on G, D, {fit.log_label} N):", False)
    if fit.standardized is not None:
        lines.append("")
        lines += _format_block(
            fit.standardized,
            "Standardised predictors (z = (x - mean) / sample std; response not standardised):",
            True,
        )
    return "\n".join(lines)


def partial_regression_figure(
    rows: Sequence[Row], fit: RegressionFit, fmt: str = "png", log: Callable[[float], float] = math.log,
    colour_by: str | None = None,
) -> bytes:
    """Added-variable plots, one panel per predictor, encoded as ``fmt`` image bytes.

    Each panel is statsmodels' ``plot_partregress``: the residuals of ``log T`` against those
    of the predictor (both regressed on the other two predictors and a constant; see
    :func:`partial_residuals`), labelled with the data set names, and the line through the
    origin whose slope is the predictor's coefficient in ``fit``. ``rows`` and ``log`` must
    be those ``fit`` came from. With ``colour_by`` (a key of the rows, e.g. the knob a study
    varied) the points are coloured by that key with a legend instead of labelled one by
    one, which stays readable for many rows.
    """
    if len(rows) != fit.n or _log_label(log) != fit.log_label:
        raise ValueError("partial_regression_figure: rows/log are not those the fit was made from")
    names = [plain_text(row.get("dataset", "")) for row in rows]
    groups = None if colour_by is None else [plain_text(row.get(colour_by, "")) for row in rows]
    # A bare Figure on an Agg canvas: no pyplot, so no global figure state to leak or close.
    fig = Figure(figsize=(13.5, 4.4), dpi=150)
    FigureCanvasAgg(fig)
    try:
        for ax, term in zip(fig.subplots(1, len(PREDICTORS)), PREDICTORS):
            _partial_regression_panel(ax, _partial_design(rows, term, log), term, fit, names, groups)
        fig.suptitle(f"Partial regression of {fit.log_label} T (n = {fit.n}, R^2 = {fit.r2:.3f})")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt)
        return buffer.getvalue()
    finally:
        fig.clear()


def _partial_regression_panel(ax, design: tuple[np.ndarray, np.ndarray, np.ndarray], term: str,
                              fit: RegressionFit, names: list[str], groups: list[str] | None) -> None:
    """One panel of :func:`partial_regression_figure` on ``ax``; ``design`` is
    :func:`_partial_design`'s."""
    response, column, others = design
    # plot_partregress draws all points in one colour: with groups they are hidden and redrawn
    # per group from the coordinates it returns.
    _, (x_resid, y_resid) = plot_partregress(
        response, column, others, obs_labels=names if groups is None else False, ax=ax,
        ret_coords=True, markersize=4.2, zorder=3, visible=groups is None,
    )
    for text in ax.texts:
        text.set_fontsize(6)  # plot_partregress writes the data set names x-large
    if groups is not None:
        for group in dict.fromkeys(groups):
            chosen = np.array([g == group for g in groups])
            ax.scatter(x_resid[chosen], y_resid[chosen], s=18, zorder=3, alpha=0.85, label=group)
        ax.legend(fontsize="small", loc="best")
    ax.axhline(0.0, color="0.8", linewidth=0.8, zorder=1)
    ax.axvline(0.0, color="0.8", linewidth=0.8, zorder=1)
    label = _term_label(term, fit.log_label, standardized=False)
    ax.set_xlabel(f"{label} | others")
    ax.set_ylabel(f"{fit.log_label} T | others")
    ax.set_title(f"{label}: coef {fit.coefficients[term]:.3g}, p = {_format_p(fit.p_values[term])}",
                 fontsize="medium")
