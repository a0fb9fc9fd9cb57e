"""Build the model design from a parsed formula and a data frame (stage 2 of the pipeline).

The design holds X (N, p), y (N,), and for every random-effect term its per-observation columns Z (N, d),
integer group codes (N,), level labels, a sparse Z for users, the nesting/crossing structure between terms and
the per-group sufficient statistics. Everything is NumPy; the JAX kernels receive it through `lmmarg.marginal`.

The rank check of X (a documented internal API, tested directly): ``qr_r`` (R of a chunked QR), ``clearly_full_rank``
(a Gram-matrix fast path) and ``aliased_columns`` (the columns lme4 would drop, by name).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import functools
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import formulaic
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._warnings import warn_user
from .codes import nested, unique_rows
from .formula import FormulaError, FormulaSpec, dotted_names, parse_formula, quote_columns, strip_ansi

__all__ = ["DesignError", "RandomTerm", "Structure", "Design", "build_design", "normalize_dtypes", "grouping_codes",
           "level_label", "used_columns", "qr_r", "clearly_full_rank", "aliased_columns", "column_standardizer",
           "standardizer_from_moments", "design_summary", "structure_of"]


def _group_sum(codes: np.ndarray, n_groups: int, w: np.ndarray) -> np.ndarray:
    """(n_groups,) sums of w (N,) by group code."""
    return np.bincount(codes, weights=w, minlength=n_groups)


def column_standardizer(M: np.ndarray) -> np.ndarray:
    """S (d, d) with M S = columns centred against M's constant column (if any) and of unit scale.

    Used to make estimation unit-free: coefficients b of M equal S b̃ for the coefficients b̃ of M S (ML's
    standardized coordinates, the sampler's coordinates of the fixed effects).

    M: (N, d) a model matrix (X, or one term's Z). Without a constant column the columns are only scaled (by their
    root mean square over the rows where they are non-zero, so that a dummy column keeps scale 1).
    """
    d = M.shape[1]
    S = np.eye(d)
    if M.shape[0] == 0:
        return S
    lo, hi = M.min(axis=0), M.max(axis=0)
    const = np.flatnonzero((lo == hi) & (lo != 0))
    c = int(const[0]) if const.size else None
    if c is not None:
        S[c, c] = 1.0 / abs(lo[c])
    for j in range(d):
        if j == c:
            continue
        a = float(np.max(np.abs(M[:, j]), initial=0.0)) or 1.0
        z = M[:, j] / a        # moments of z / a, then scaled back: x * 1e-160 would square to denormals, 1e-300 to 0
        if c is not None:
            m, s = a * float(z.mean()), a * float(z.std())
        else:
            nz = z[z != 0]
            m, s = 0.0, a * float(np.sqrt(np.mean(nz ** 2))) if nz.size else 1.0
        if not np.isfinite(s) or s <= 0:
            m, s = 0.0, 1.0
        S[j, j] = 1.0 / s
        if c is not None:
            S[c, j] = -m / (lo[c] * s)
    return S


def standardizer_from_moments(n, nnz, lo, hi, mean, m2) -> np.ndarray:
    """:func:`column_standardizer` of a matrix known only by its column moments (rows that never sit in one
    process, ``lmmarg.sufficient``): n, nnz (non-zero rows), lo, hi (min, max), mean, m2 (sum of squared deviations
    from the mean), each (d,). The same rules: a constant column centres the others, else root mean square over the
    non-zero rows."""
    d = len(lo)
    S = np.eye(d)
    if d == 0 or not np.any(np.asarray(n) > 0):
        return S
    const = np.flatnonzero((np.asarray(lo) == np.asarray(hi)) & (np.asarray(lo) != 0))
    c = int(const[0]) if const.size else None
    if c is not None:
        S[c, c] = 1.0 / abs(lo[c])
    for j in range(d):
        if j == c:
            continue
        var = max(float(m2[j]) / float(n[j]), 0.0) if n[j] else 0.0
        if c is not None:
            m, s = float(mean[j]), float(np.sqrt(var))
        else:
            ss = var * float(n[j]) + float(n[j]) * float(mean[j]) ** 2   # Σ x² = m2 + n mean²
            m, s = 0.0, (float(np.sqrt(ss / nnz[j])) if nnz[j] else 1.0)
        if not np.isfinite(s) or s <= 0:
            m, s = 0.0, 1.0
        S[j, j] = 1.0 / s
        if c is not None:
            S[c, j] = -m / (lo[c] * s)
    return S


class DesignError(ValueError):
    """Bad data for the model; the message names the column, term or level at fault."""


@dataclass(eq=False)
class RandomTerm:
    """One random-effect class: u_g ~ N(0, Σ) i.i.d. over the groups g, Σ of size d × d.

    name: unique term name (grouping expression as written, ".1", ".2" appended to repeats).
    group: grouping expression, e.g. "batch:cask"; factors: its columns.
    columns: formulaic names of the term's d columns, e.g. ["Intercept", "Days"].
    levels: group labels, in the order of every per-group array; codes: (N,) int index into levels.
    Z: (N, d) per-observation columns.
    """

    name: str
    group: str
    factors: tuple[str, ...]
    expr: str
    columns: list[str]
    levels: list[str]
    codes: np.ndarray
    Z: np.ndarray
    correlated: bool = True
    model_spec: object = field(default=None, repr=False)
    level_keys: list[tuple] = field(default_factory=list, repr=False)

    @property
    def n_groups(self) -> int:
        return len(self.levels)

    @property
    def d(self) -> int:
        return self.Z.shape[1]

    @cached_property
    def Z_sparse(self) -> sp.csr_matrix:
        """(N, n_groups * d) sparse Z; column g * d + j is column j of group g (lme4's order)."""
        n, d = self.Z.shape
        rows = np.repeat(np.arange(n), d)
        cols = (self.codes[:, None] * d + np.arange(d)[None, :]).ravel()
        return sp.csr_matrix((self.Z.ravel(), (rows, cols)), shape=(n, self.n_groups * d))


@dataclass
class Structure:
    """Relations between random-effect terms.

    relations[(a, b)] for term names a != b is one of "nested" (every group of a lies in one group of b),
    "contains" (the reverse), "same" (same grouping factor) or "crossed".
    kind: "none", "single", "nested", "crossed" or "nested+crossed" (over distinct grouping factors).
    """

    relations: dict
    kind: str

    def relation(self, a: str, b: str) -> str:
        return self.relations[(a, b)]

    def __str__(self) -> str:
        lines = [f"structure: {self.kind}"]
        for (a, b), rel in self.relations.items():
            if rel in ("nested", "crossed") and (rel == "nested" or a < b):
                lines.append(f"  {a} {'nested in' if rel == 'nested' else 'crossed with'} {b}")
        return "\n".join(lines)


@dataclass(eq=False)
class Design:
    """All model matrices for one formula and data set. Shapes: X (N, p), y (N,), term.Z (N, d)."""

    spec: FormulaSpec
    data: pd.DataFrame
    y: np.ndarray
    X: np.ndarray
    fixed_names: list[str]
    terms: list[RandomTerm]
    structure: Structure
    fixed_spec: object = field(default=None, repr=False)
    offset: np.ndarray | None = None  # (N,) sum of the formula's offset(...) terms; None without offsets
    offset_specs: list = field(default_factory=list, repr=False)  # formulaic specs to evaluate them on new data
    failures: np.ndarray | None = None  # (N,) the failures of a cbind(successes, failures) response

    @property
    def n_obs(self) -> int:
        return len(self.y)

    @property
    def response(self) -> str:
        return self.spec.response

    def term(self, name: str) -> RandomTerm:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no random-effect term {name!r}; terms are {[t.name for t in self.terms]}")

    @cached_property
    def stats(self) -> dict:
        """Sufficient statistics, computed once: XtX (p,p), Xty (p,), yty, and per term name
        ZtZ (G,d,d), ZtX (G,d,p), Zty (G,d), n (G,) observations per group."""
        out = {"XtX": self.X.T @ self.X, "Xty": self.X.T @ self.y, "yty": float(self.y @ self.y)}
        for t in self.terms:
            G, d, p = t.n_groups, t.d, self.X.shape[1]
            seg = functools.partial(_group_sum, t.codes, G)
            out[t.name] = {
                "ZtZ": np.stack([[seg(t.Z[:, a] * t.Z[:, b]) for b in range(d)] for a in range(d)], -1)
                .transpose(1, 0, 2) if d else np.zeros((G, 0, 0)),
                "ZtX": np.stack([[seg(t.Z[:, a] * self.X[:, j]) for j in range(p)] for a in range(d)], 0)
                .transpose(2, 0, 1),
                "Zty": np.stack([seg(t.Z[:, a] * self.y) for a in range(d)], -1),
                "n": np.bincount(t.codes, minlength=G),
            }
        return out

    def summary(self, title: str = "Linear mixed model") -> str:
        """Compact lme4-like description: N, fixed columns, each term with d and groups, structure; ``title`` names
        the kind of model (the Model passes its family)."""
        return design_summary(title, self.spec.formula, f"{self.n_obs}", self.fixed_names, self.terms,
                              self.structure)

    __str__ = summary


def design_summary(title: str, formula: str, observations: str, fixed_names, terms, structure) -> str:
    """The lme4-like description of a design (``Design.summary``; ``lmmarg.statdesign.StatisticsDesign.summary``
    passes its observation line with the cells summarized)."""
    lines = [f"{title}: {formula}", f"  observations: {observations}",
             f"  fixed effects ({len(fixed_names)}): {', '.join(fixed_names)}", "  random effects:"]
    width = max([len(t.name) for t in terms] + [4])
    for t in terms:
        corr = "" if t.d == 1 else (" correlated" if t.correlated else "")
        lines.append(f"    {t.name:<{width}}  groups {t.n_groups:>6}  d={t.d}  [{', '.join(t.columns)}]{corr}")
    if not terms:
        lines.append("    (none)")
    lines.extend("  " + s for s in str(structure).splitlines())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# building


def _unknown_column(name: str, data: pd.DataFrame, where: str) -> DesignError:
    close = difflib.get_close_matches(name, [str(c) for c in data.columns], n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; columns are {list(data.columns)}"
    return DesignError(f"unknown column {name!r} in {where}{hint}")


_QUOTED = re.compile(r"`([^`]+)`")
_TOKEN = re.compile(r"(?<![\w.`])(?:[^\W\d]|\.)[\w.]*")


def _formulaic_error(exc: Exception) -> str:
    """formulaic's error text without terminal colour codes, with a hint for Python operators it cannot parse."""
    text = strip_ansi(exc)
    if "Unknown operator" in text:
        text += ("\n(formula operators are + - : * / ** ^ |; wrap a Python expression in I(...), e.g. "
                 "I(use == 'Y') ~ x)")
    return text


def _variables(expr: str, where: str) -> set[str]:
    try:
        found = set(formulaic.Formula(expr).required_variables)
    except Exception as exc:  # formulaic's own parser errors
        raise FormulaError(f"cannot parse {where} {expr!r}: {_formulaic_error(exc)}") from None
    # formulaic reports a quoted `my.x` or a bare dotted y.val as the variable 'my' / 'y' (attribute access); the
    # dotted name is the column (build_design quotes those the data has; the others are reported as unknown)
    quoted = set(_QUOTED.findall(expr))
    dotted = {n for n in dotted_names(expr) if n.split(".")[0] in found}  # not np.pi, contr.sum (formulaic's own)
    plain = set(_TOKEN.findall(re.sub(r"`[^`]*`", " ", expr)))
    spurious = {v for v in found if v not in plain and any(q.startswith(v + ".") for q in quoted | dotted)}
    return (found - spurious) | quoted | dotted


def used_columns(spec: FormulaSpec) -> dict[str, str]:
    """{data column: where the formula uses it (for messages)}, in formula order."""
    used: dict[str, str] = {}
    for v in _variables(f"{spec.response} ~ 1", "response"):
        used.setdefault(v, f"the response {spec.response!r}")
    if spec.failures is not None:
        for v in _variables(f"I({spec.failures}) ~ 1", "failures"):
            used.setdefault(v, f"the failures {spec.failures!r} of cbind()")
    for v in _variables(spec.fixed, "fixed effects"):
        used.setdefault(v, "the fixed effects")
    for expr in spec.offsets:
        for v in _variables(f"I({expr})", f"offset({expr})"):
            used.setdefault(v, f"offset({expr})")
    for bar in spec.bars:
        for v in _variables(bar.expr, f"random-effect term ({bar.expr} | {bar.group})"):
            used.setdefault(v, f"random-effect term ({bar.expr} | {bar.group})")
        for f in bar.factors:
            used.setdefault(f, f"grouping factor of ({bar.expr} | {bar.group})")
    return used


def _check_columns(spec: FormulaSpec, data: pd.DataFrame, extra: dict[str, str]) -> list[str]:
    """Return every data column the formula (and ``extra``: {column: where}) uses; raise naming an unknown one."""
    used = used_columns(spec)
    for name, where in extra.items():
        used.setdefault(name, where)
    columns = set(map(str, data.columns))
    for name, where in used.items():
        if name not in columns:
            # formulaic also reports names of functions it could not resolve; only flag plain names
            raise _unknown_column(name, data, where)
    if "Intercept" in used and not used["Intercept"].startswith("the response"):
        # formulaic would merge it with the intercept column of the same name
        raise DesignError(f"data column 'Intercept' is used in {used['Intercept']}, but 'Intercept' is the name of "
                          "the model's intercept; rename the data column")
    return list(used)


def _check_data_columns(data: pd.DataFrame) -> None:
    """Column names must be unique (after conversion to str) for a column to be looked up by its name."""
    names = pd.Index(map(str, data.columns))
    dup = names[names.duplicated()].unique().tolist()
    if dup:
        raise DesignError(f"data has duplicate column name(s) {dup}; rename them so that each name is unique")


def _check_bars(spec: FormulaSpec) -> None:
    """A random-effect term written twice is an error (lme4 would fit two copies of one variance)."""
    seen = set()
    for bar in spec.bars:
        key = (bar.expr.replace(" ", ""), bar.factors, bar.correlated)
        if key in seen:
            sep = "|" if bar.correlated else "||"
            raise FormulaError(f"random-effect term ({bar.expr} {sep} {bar.group}) appears twice in "
                               f"{spec.formula!r} (after expanding a/b nesting); remove the duplicate")
        seen.add(key)


def _check_duplicate_terms(terms: list[RandomTerm], formula: str) -> None:
    """Two terms with the same grouping and the same columns, e.g. from (x || g) + (1 | g), are an error."""
    seen: dict[tuple, RandomTerm] = {}
    for t in terms:
        key = (t.factors, tuple(t.columns))
        if key in seen:
            raise FormulaError(f"random-effect column(s) {t.columns} of grouping factor {t.group!r} appear in two "
                               f"terms ({seen[key].name!r} and {t.name!r}) of {formula!r}; remove the duplicate")
        seen[key] = t


def _warn_fixed_grouping(terms: list[RandomTerm], fixed_names: list[str]) -> None:
    """Warn when a grouping factor with random intercepts also enters the fixed part as a factor."""
    for g in dict.fromkeys(t.group for t in terms if len(t.factors) == 1 and "Intercept" in t.columns):
        quoted = f"`{g}`" if not re.match(r"^(?:[^\W\d]|\.)[\w.]*$", g) else g
        prefixes = tuple(f"{pre}[" for pre in (g, quoted, f"C({g})", f"C({quoted})"))
        if any(n.startswith(prefixes) for n in fixed_names):
            warn_user(f"grouping factor {g!r} is also a fixed effect (factor columns {g}[...] in the fixed part): "
                      f"its random intercepts are not identified separately from the fixed effects of {g!r}; "
                      "remove one of them")


def _handle_missing(data: pd.DataFrame, used: list[str], na_action: str) -> pd.DataFrame:
    bad_rows = np.zeros(len(data), bool)
    culprits = []
    for col in used:
        s = data[col]
        missing = s.isna().to_numpy().copy()
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            missing |= ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
        if missing.any():
            culprits.append(f"{col!r} ({missing.sum()} rows, first at row {np.flatnonzero(missing)[0]})")
            bad_rows |= missing
    if not bad_rows.any():
        return data
    if na_action == "raise":
        raise DesignError(
            "missing or non-finite values in column " + ", ".join(culprits)
            + "; clean the data or pass na_action='drop' to drop those rows with a warning"
        )
    warnings.warn(f"dropped {bad_rows.sum()} of {len(data)} rows with missing/non-finite values in "
                  + ", ".join(culprits), stacklevel=4)
    return data.loc[~bad_rows]


def _model_matrix(expr: str, data: pd.DataFrame, where: str):
    try:
        with np.errstate(all="ignore"):
            mm = formulaic.model_matrix(expr, data, na_action="ignore")
    except Exception as exc:
        raise DesignError(f"cannot build the model matrix of {where} {expr!r}: {_formulaic_error(exc)}") from None
    values = np.asarray(mm, dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        col = list(mm.columns)[np.flatnonzero(bad.any(0))[0]]
        row = int(np.flatnonzero(bad.any(1))[0])
        raise DesignError(f"column {col!r} of {where} is not finite (first at row {row}, e.g. log of 0)")
    return values, list(mm.columns), mm.model_spec


def _response(expr: str, data: pd.DataFrame) -> np.ndarray:
    """The response (N,) as floats; a bool column (True/False, pandas boolean) is 0/1."""
    name = expr[1:-1] if _QUOTED.fullmatch(expr) else expr
    raw = data[name] if name in data.columns else None
    if raw is not None and not pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        raise DesignError(f"response {expr!r} must be numeric (or bool, taken as 0/1), got dtype {raw.dtype}")
    if raw is not None and pd.api.types.is_bool_dtype(raw):
        return np.asarray(raw, dtype=float)  # missing values were handled before (na_action)
    try:
        with np.errstate(all="ignore"):
            mm = formulaic.model_matrix(f"{expr} ~ 1", data, na_action="ignore")
    except Exception as exc:
        raise DesignError(f"cannot evaluate the response {expr!r}: {_formulaic_error(exc)}") from None
    lhs = mm.lhs
    if lhs.shape[1] != 1:
        raise DesignError(f"response {expr!r} must be a single numeric column, got {list(lhs.columns)}")
    y = np.asarray(lhs, dtype=float)[:, 0]
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DesignError(f"response {expr!r} is not finite at row {row} (value {y[row]})")
    return y


def qr_r(X: np.ndarray, chunk_bytes: int = 1 << 25) -> np.ndarray:
    """R factor (min(N, p), p) of X (N, p) by a QR over row chunks (TSQR): O(N p²) time, O(p² + chunk) memory.

    Householder QR is column-wise backward stable, so R is exact for X + E with |E_j| ≲ eps |X_j| per column.
    """
    N, p = X.shape
    rows = max(4 * p, chunk_bytes // (8 * max(p, 1)))  # >= 4p rows: re-factoring the stacked R stays cheap
    R = np.zeros((0, p))
    for s in range(0, N, rows):
        R = np.linalg.qr(np.vstack([R, X[s:s + rows]]), mode="r")
    return R


def clearly_full_rank(X: np.ndarray, margin: float = 1e-6) -> bool:
    """Fast path of the rank check: X (N, p) has full column rank with every column at distance > sqrt(margin)
    (relative to its norm) from the span of the earlier ones. From XᵀX (one BLAS pass, much cheaper than the
    QR): the squared diagonal of the Cholesky factor of the unit-diagonal Gram matrix holds those squared
    distances, with an error near N·eps, far below ``margin``. False means "ask the QR", not "rank deficient"."""
    G = X.T @ X
    d = np.sqrt(np.diag(G))
    if not (d > 0).all():
        return False
    try:
        L = np.linalg.cholesky(G / np.outer(d, d))
    except np.linalg.LinAlgError:
        return False
    return bool(np.diag(L).min() ** 2 > margin)


def aliased_columns(X: np.ndarray, names: list[str], tol: float = 1e-9) -> list[str]:
    """Columns of X (N, p) that are linear combinations of earlier columns (lme4 drops these).

    Column j is aliased when its distance to the span of the earlier non-aliased columns is at most ``tol`` times
    its norm. X only enters through R of its QR (X = QR, so distances are those of R's columns): the test costs
    O(N p²) for R plus O(p³) for a Gram-Schmidt pass over R's columns, kept directions only (reorthogonalized).
    """
    p = X.shape[1]
    if p == 0 or clearly_full_rank(X):
        return []
    R = qr_r(X)
    R = np.vstack([R, np.zeros((p - R.shape[0], p))]) if R.shape[0] < p else R
    norms = np.linalg.norm(R, axis=0)
    Q = np.zeros((p, p))
    k, aliased = 0, []
    for j in range(p):
        if norms[j] == 0:
            aliased.append(names[j])
            continue
        v = R[:, j] / norms[j]
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            v = v - Q[:, :k] @ (Q[:, :k].T @ v)
        dist = np.linalg.norm(v)
        if dist <= tol:
            aliased.append(names[j])
        else:
            Q[:, k] = v / dist
            k += 1
    return aliased


# Largest |value| of a fixed-effect column: its square (every Gram matrix, sum of squares and variance of the
# fit) must stay finite in float64 (max 1.8e308).
_MAX_ABS_VALUE = float(np.sqrt(np.finfo(np.float64).max))


def _check_rank(X: np.ndarray, names: list[str]) -> None:
    """Raise naming the fixed-effect columns that are linear combinations of earlier ones, or whose values are so
    large that their squares overflow. The rank test is scale-invariant: each column is divided by its largest
    |value| first (the test is relative to column norms; unscaled, x * 1e300 overflowed XᵀX and x * 1e-300
    underflowed it, both reported as rank deficient with numpy warnings)."""
    big = np.max(np.abs(X), axis=0, initial=0.0)
    over = np.flatnonzero(big > _MAX_ABS_VALUE)
    if over.size:
        j = int(over[0])
        i = int(np.argmax(np.abs(X[:, j])))
        raise DesignError(f"fixed-effect column {names[j]!r} has the value {X[i, j]:.3g} (row {i}), whose square "
                          f"overflows float64 (|values| must stay below {_MAX_ABS_VALUE:.3g}); rescale it (e.g. "
                          "divide by a power of 10) or transform it (log)")
    aliased = aliased_columns(X / np.where(big > 0, big, 1.0), names)
    if not aliased:
        return
    zero = [n for n in aliased if not X[:, names.index(n)].any()]
    msg = (f"fixed-effects model matrix is rank deficient: column(s) {aliased} are linear combinations of earlier "
           "columns")
    if zero:
        msg += (f"; {zero} are all zero: no row has that level or combination of levels (an empty cell of an "
                "interaction, or a constant column)")
    raise DesignError(msg + "; remove them from the formula")


def _drop_unused_levels(data: pd.DataFrame, used: list[str], spec: FormulaSpec) -> pd.DataFrame:
    """Drop categories no row has from the categorical columns the formula uses (lme4's drop.unused.levels);
    warn naming them for columns of the fixed or random-effect expressions, where they would be all-zero columns."""
    grouping_only = {f for bar in spec.bars for f in bar.factors}
    grouping_only -= _variables(spec.fixed, "fixed effects").union(*(_variables(b.expr, "random effects")
                                                                       for b in spec.bars))
    out = data
    for col in used:
        s = data[col]
        if not isinstance(s.dtype, pd.CategoricalDtype):
            continue
        counts = s.value_counts(sort=False)
        unused = counts.index[counts.to_numpy() == 0].tolist()
        if not unused:
            continue
        if out is data:
            out = data.copy()
        out[col] = s.cat.remove_unused_categories()
        if col not in grouping_only:
            warn_user(f"factor {col!r} has unused level(s) {unused} (categories no row has); they are dropped, as "
                      f"lme4 does. To silence this: data[{col!r}] = data[{col!r}].cat.remove_unused_categories()")
    return out


def _level_codes(values: pd.Series) -> tuple[np.ndarray, list]:
    """Rank of each row's value among the sorted distinct values, and those values (natural order: numeric or
    categorical order, else text). One hash factorization in the column's own dtype; only the distinct values are
    sorted and compared as Python objects."""
    codes, uniq = pd.factorize(values, sort=False, use_na_sentinel=False)
    uniq = list(uniq.astype(object)) if hasattr(uniq, "astype") else list(uniq)
    if isinstance(values.dtype, pd.CategoricalDtype):
        rank = {c: i for i, c in enumerate(values.cat.categories)}
        order = sorted(uniq, key=lambda v: rank.get(v, len(rank)))
    else:
        try:
            order = sorted(uniq)
        except TypeError:
            order = sorted(uniq, key=str)
    perm = pd.Index(order, dtype=object).get_indexer(pd.Index(uniq, dtype=object))
    return perm[codes].astype(np.int64), order


def _is_missing(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # array-like values are not missing scalars
        return False


def _check_levels(column: str, order: list) -> None:
    """Levels of a grouping column: none missing, and distinct values must print distinctly (they become labels)."""
    if any(_is_missing(v) for v in order):
        raise DesignError(f"grouping column {column!r} has missing values (NaN/None); clean the data or pass "
                          "na_action='drop'")
    seen: dict[str, object] = {}
    for v in order:
        label = str(v)
        if label in seen:
            w = seen[label]
            raise DesignError(f"grouping column {column!r} holds the distinct values {w!r} ({type(w).__name__}) and "
                              f"{v!r} ({type(v).__name__}), both labelled {label!r}; give the column one type, "
                              f"e.g. data[{column!r}] = data[{column!r}].astype(str)")
        seen[label] = v


def grouping_codes(data: pd.DataFrame, factors: tuple[str, ...]) -> tuple[np.ndarray, list[str], list[tuple]]:
    """(codes (N,) int64, labels, level keys) of the interaction of the grouping columns `factors`, levels in
    lexicographic order of the factors' sorted levels (the random-effect terms' and the priors' group order)."""
    per_factor = []
    for f in factors:
        ranks, order = _level_codes(data[f])
        _check_levels(f, order)
        per_factor.append((ranks, order))
    # the interaction's levels in lexicographic order of the factors' sorted levels
    uniq, codes = unique_rows(np.stack([c for c, _ in per_factor], 1), [len(order) for _, order in per_factor])
    keys = [tuple(per_factor[j][1][k] for j, k in enumerate(row)) for row in uniq]
    labels = [level_label(key) for key in keys]
    return codes.reshape(-1).astype(np.int64), labels, keys


def level_label(key: tuple) -> str:
    """The label of one level of an interaction of grouping factors: the factors' levels joined by ":", a level
    that itself contains ":" or a backtick put in backticks (backticks doubled), so that distinct levels always
    get distinct labels ("x:y" of a with "b" of b -> "`x:y`:b", not "x:y:b" as for "x" with "y:b").

    >>> level_label(("x:y", "b")), level_label(("x", "y:b")), level_label((3,)), level_label(("x:y",))
    ('`x:y`:b', 'x:`y:b`', '3', 'x:y')
    """
    parts = [str(v) for v in key]
    if len(parts) == 1:  # one factor: its levels print distinctly (_check_levels)
        return parts[0]
    return ":".join(f"`{p.replace('`', '``')}`" if (":" in p or "`" in p) else p for p in parts)


def _structure(terms: list[RandomTerm]) -> Structure:
    return structure_of(terms, [t.codes for t in terms])


def structure_of(terms, codes) -> Structure:
    """Relations between ``terms`` (name, group) from their group codes, one (n,) int array per term over the same
    n rows -- observations, or the cells of sufficient statistics (a relation over rows holds over the cells that
    hold them)."""
    relations = {}
    code_of = {id(t): c for t, c in zip(terms, codes)}

    def within(a, b) -> bool:
        """Every level of a lies in one level of b."""
        return nested(code_of[id(a)], code_of[id(b)])

    kinds = set()
    for a in terms:
        for b in terms:
            if a is b:
                continue
            if a.group == b.group:
                relations[(a.name, b.name)] = "same"
            elif within(a, b):
                relations[(a.name, b.name)] = "nested"
                kinds.add("nested")
            elif within(b, a):
                relations[(a.name, b.name)] = "contains"
            else:
                relations[(a.name, b.name)] = "crossed"
                kinds.add("crossed")
    groups = {t.group for t in terms}
    kind = ("none" if not terms else "single" if len(groups) == 1 else
            "+".join(k for k in ("nested", "crossed") if k in kinds))
    return Structure(relations=relations, kind=kind)


def _unique_names(terms: list[RandomTerm]) -> None:
    seen: dict[str, int] = {}
    for t in terms:
        k = seen.get(t.group, 0)
        t.name = t.group if k == 0 else f"{t.group}.{k}"
        seen[t.group] = k + 1


def _random_terms(spec: FormulaSpec, data: pd.DataFrame) -> list[RandomTerm]:
    terms = []
    for bar in spec.bars:
        where = f"random-effect term ({bar.expr} | {bar.group})"
        Z, cols, mspec = _model_matrix(bar.expr, data, where)
        if Z.shape[1] == 0:
            raise DesignError(f"{where} has no columns")
        codes, levels, keys = grouping_codes(data, bar.factors)
        pieces = [(bar.expr, Z, cols, mspec)]
        if not bar.correlated:
            # ||: lme4's expandDoubleVerts: (1 | g) if there is an intercept, then (0 + <term> | g) per formula
            # term, each evaluated on its own (a factor gets all its indicator columns, one correlated block)
            pieces = []
            for term in mspec.term_indices:
                texpr = "1" if str(term) == "1" else f"0 + {term}"
                pieces.append((texpr, *_model_matrix(texpr, data, where)))
        for texpr, Zt, ct, st in pieces:
            terms.append(RandomTerm(name=bar.group, group=bar.group, factors=bar.factors, expr=texpr,
                                    columns=list(ct), levels=levels, codes=codes, Z=np.ascontiguousarray(Zt),
                                    correlated=bar.correlated, model_spec=st, level_keys=keys))
    _unique_names(terms)
    return terms


def _warn_identifiability(terms: list[RandomTerm], n_obs: int, residual: bool = True) -> None:
    """Warn about terms whose variance is not identified (a GLMM has no residual variance: an observation-level
    term is fine there, ``residual=False``)."""
    for t in terms:
        if t.n_groups < 2:
            warnings.warn(f"grouping factor {t.group!r} of term {t.name!r} has a single level "
                          f"({t.levels[0]!r}): its variance is not identified", stacklevel=4)
        elif residual and t.n_groups * t.d >= n_obs:
            warnings.warn(f"term {t.name!r}: number of observations (={n_obs}) <= number of random effects "
                          f"(={t.n_groups * t.d}); its variance and the residual variance are probably "
                          "unidentifiable", stacklevel=4)


def build_design(formula: str | FormulaSpec, data, na_action: str = "raise",
                 extra_columns: dict[str, str] | None = None, residual: bool = True) -> Design:
    """Parse `formula` and build every model matrix from `data` (a pandas DataFrame or dict of columns).

    na_action: "raise" (default: rows with NaN/inf in used columns are an error naming the column) or "drop"
    (drop them with a warning giving the count).
    extra_columns: {column: where it is used}, columns the model needs beyond the formula (``sigma_by``, a sigma
    formula): they must exist, and rows missing them follow ``na_action`` like the formula's own columns.
    residual: whether the model has a residual variance (False for GLMM families).
    """
    spec = formula if isinstance(formula, FormulaSpec) else parse_formula(formula)
    if na_action not in ("raise", "drop"):
        raise ValueError(f"na_action must be 'raise' or 'drop', got {na_action!r}")
    if isinstance(data, dict):
        data = pd.DataFrame(data)
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame or a dict of columns, got {type(data).__name__}")
    if len(data) == 0:
        raise DesignError("data has no rows")
    _check_data_columns(data)
    data = data.rename(columns=str)
    _check_bars(spec)
    spec = _quote_dotted(spec, data.columns)
    used = _check_columns(spec, data, dict(extra_columns or {}))
    data = _handle_missing(data, used, na_action).reset_index(drop=True)
    if len(data) == 0:
        raise DesignError("no rows left after dropping missing values")
    data = normalize_dtypes(data, used)
    data = _drop_unused_levels(data, used, spec)
    y = _response(spec.response, data)
    failures = None
    if spec.failures is not None:  # R arithmetic (size - incidence), not formula operators
        expr = spec.failures if spec.failures in data.columns else f"I({spec.failures})"
        failures = _response(expr, data)
    X, fixed_names, fixed_spec = _model_matrix(spec.fixed, data, "the fixed effects")
    _check_rank(X, fixed_names)
    terms = _random_terms(spec, data)
    _check_duplicate_terms(terms, spec.formula)
    _warn_fixed_grouping(terms, fixed_names)
    _warn_identifiability(terms, len(y), residual)
    offset, offset_specs = _offsets(spec, data)
    return Design(spec=spec, data=data, y=y, X=X, fixed_names=fixed_names, terms=terms,
                  structure=_structure(terms), fixed_spec=fixed_spec, offset=offset, offset_specs=offset_specs,
                  failures=failures)


def _quote_dotted(spec: FormulaSpec, columns) -> FormulaSpec:
    """The spec with R-style dotted column names (y.val, x.1) in backticks wherever they are data columns
    (``lmmarg.formula.quote_columns``); a response that is exactly a column name is left as written."""
    cols = set(map(str, columns))

    def q(expr):
        return expr if expr is None else quote_columns(expr, cols)

    bars = tuple(dataclasses.replace(b, expr=q(b.expr)) for b in spec.bars)
    response = spec.response if spec.response in cols else q(spec.response)
    return dataclasses.replace(spec, response=response, fixed=q(spec.fixed), bars=bars,
                               offsets=tuple(q(e) for e in spec.offsets), failures=q(spec.failures))


def normalize_dtypes(data: pd.DataFrame, columns) -> pd.DataFrame:
    """``data`` with the pandas extension dtypes of ``columns`` turned into their NumPy counterparts, so that every
    column behaves the same whatever its storage: nullable Int64/Float64/boolean and Arrow-backed
    ``int64[pyarrow]`` / ``double[pyarrow]`` / ``bool[pyarrow]`` -> int64 / float64 / bool (float64 if values are
    missing), ``string`` / ``string[pyarrow]`` (and other extension dtypes) -> object. Categoricals are kept (their
    categories become object if they are of an extension dtype). Missing values (pd.NA) become NaN.
    Returns ``data`` itself when nothing changes, else a copy (N rows, same columns)."""
    out = data
    for col in columns:
        if col not in data.columns:
            continue
        s = data[col]
        dtype = s.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cats = dtype.categories
            if not isinstance(cats.dtype, pd.api.extensions.ExtensionDtype):
                continue
            new = pd.Series(pd.Categorical.from_codes(s.cat.codes.to_numpy(), categories=pd.Index(cats.astype(object),
                            dtype=object), ordered=dtype.ordered), index=s.index)
        elif not isinstance(dtype, pd.api.extensions.ExtensionDtype):
            continue
        elif pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype):
            missing = s.isna().to_numpy()
            target = float if missing.any() else (bool if pd.api.types.is_bool_dtype(dtype) else np.int64)
            new = pd.Series(s.to_numpy(dtype=target, na_value=np.nan) if target is float else s.to_numpy(dtype=target),
                            index=s.index)
        elif pd.api.types.is_float_dtype(dtype):
            new = pd.Series(s.to_numpy(dtype=float, na_value=np.nan), index=s.index)
        else:
            new = pd.Series(s.to_numpy(dtype=object, na_value=np.nan), index=s.index, dtype=object)
        if out is data:
            out = data.copy()
        out[col] = new
    return out


def _offsets(spec: FormulaSpec, data: pd.DataFrame) -> tuple[np.ndarray | None, list]:
    """Sum (N,) of the formula's offset(expr) terms and their formulaic specs; (None, []) without offsets."""
    if not spec.offsets:
        return None, []
    total, specs = np.zeros(len(data)), []
    for expr in spec.offsets:
        vals, cols, mspec = _model_matrix(f"0 + I({expr})", data, f"offset({expr})")  # R arithmetic
        if vals.shape[1] != 1:
            raise DesignError(f"offset({expr}) must be one numeric column, got columns {cols}")
        total += vals[:, 0]
        specs.append(mspec)
    return total, specs
