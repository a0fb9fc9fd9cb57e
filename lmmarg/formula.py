"""Parse lme4-style mixed-model formulas (stage 1 of the pipeline).

formulaic does not understand ``|``, so the random-effect ("bar") terms are split out of the right-hand side
first, following lme4's ``findbars`` / ``expandDoubleVerts`` / ``expandSlash`` semantics; the fixed part and each
bar's left-hand expression are handed to formulaic unchanged.

>>> spec = parse_formula("log(rt) ~ cond + (cond | subj) + (1 | batch/cask)")
>>> spec.response, spec.fixed
('log(rt)', 'cond')
>>> [(b.expr, b.group) for b in spec.bars]
[('cond', 'subj'), ('1', 'batch'), ('1', 'batch:cask')]
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FormulaError", "BarTerm", "FormulaSpec", "parse_formula", "r_habits", "split_top_level", "quote_columns",
           "dotted_names", "strip_ansi"]


class FormulaError(ValueError):
    """A formula that cannot be parsed; the message quotes the offending part."""


@dataclass(frozen=True)
class BarTerm:
    """One random-effect term ``(expr | group)`` after expansion.

    expr: right-hand side of the term's own model matrix (formulaic syntax, intercept implied unless removed).
    group: grouping expression, factors joined by ``:`` (e.g. ``"batch:cask"``).
    factors: the grouping factor column names, e.g. ``("batch", "cask")``.
    correlated: False for terms produced by ``||`` (one independent term per column, split in the design).
    """

    expr: str
    group: str
    factors: tuple[str, ...]
    correlated: bool = True


@dataclass(frozen=True)
class FormulaSpec:
    """A parsed formula: response expression, fixed-effects right-hand side and the bar terms in order."""

    formula: str
    response: str
    fixed: str
    bars: tuple[BarTerm, ...]
    offsets: tuple[str, ...] = ()  # expressions of top-level offset(...) terms, added to the linear predictor
    failures: str | None = None    # lme4's binomial response cbind(successes, failures): the failures expression


# a bare column name: letters of any script, digits, "_" and "." (R's names, e.g. g.id, 群, sujet_é), not starting
# with a digit; anything else is quoted with backticks (`my g`, `a|b`)
_NAME = re.compile(r"^(?:[^\W\d]|\.)[\w.]*$|^`[^`]+`$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text) -> str:
    """``str(text)`` without terminal colour codes (formulaic's parser errors highlight the culprit with them)."""
    return _ANSI.sub("", str(text))


def _unquoted(text: str) -> str:
    """``text`` with the inside of quotes and backticks blanked out (same length), to look for operators."""
    out, quote = [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
            out.append(ch if quote is None else " ")
        else:
            quote = ch if ch in "'\"`" else None
            out.append(ch)
    return "".join(out)


# a dotted name such as y.val or x.1 (R's habit): formulaic reads y.val in a Python expression as attribute access
_DOTTED = re.compile(r"(?<![\w.])(?:[^\W\d]|\.)[\w]*(?:\.[\w]*)+")


def quote_columns(expr: str, columns) -> str:
    """``expr`` with every bare dotted name that is a data column (``y.val``, ``x.1``) put in backticks, so that
    formulaic reads it as the column in every context (``log(y.val)``, ``x.1:x.2``, ``I(x.1^2)``), not as attribute
    access. Names followed by ``(`` (``np.log(``) and text inside quotes or backticks are left alone.

    >>> quote_columns("log(y.val) + np.exp(x.1) + `x.1`", {"y.val", "x.1"})
    'log(`y.val`) + np.exp(`x.1`) + `x.1`'
    """
    columns = set(columns)
    blank = _unquoted(expr)
    out, last = [], 0
    for m in _DOTTED.finditer(blank):
        name = m.group(0)
        rest = blank[m.end():].lstrip()
        if name not in columns or rest.startswith("(") or (m.start() > 0 and blank[m.start() - 1] == "`"):
            continue
        out.append(expr[last:m.start()] + f"`{name}`")
        last = m.end()
    return "".join(out) + expr[last:]


def dotted_names(expr: str) -> list[str]:
    """The bare dotted names in ``expr`` (outside quotes, not followed by ``(``): candidates for column names."""
    blank = _unquoted(expr)
    return [m.group(0) for m in _DOTTED.finditer(blank)
            if not blank[m.end():].lstrip().startswith("(") and not (m.start() > 0 and blank[m.start() - 1] == "`")]


def split_top_level(text: str, seps: str) -> list[tuple[str, str]]:
    """Split ``text`` at characters of ``seps`` outside brackets/quotes; returns ``[(sep_before, part), ...]``.

    The first part gets ``sep_before=""``. Raises FormulaError on unbalanced parentheses.
    """
    parts, depth, start, quote, last_sep = [], 0, 0, None, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced parentheses in {text!r}: unexpected ')' at position {i}")
        elif depth == 0 and ch in seps:
            parts.append((last_sep, text[start:i]))
            last_sep, start = ch, i + 1
    if depth != 0 or quote:
        raise FormulaError(f"unbalanced parentheses or quotes in {text!r}")
    parts.append((last_sep, text[start:]))
    return parts


def _strip_outer_parens(term: str) -> str | None:
    """Return the inside of ``(...)`` if the whole term is one parenthesized group, else None."""
    term = term.strip()
    if not (term.startswith("(") and term.endswith(")")):
        return None
    depth = 0
    for i, ch in enumerate(term):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(term) - 1:
            return None
    return term[1:-1]


def _parse_group(group: str, bar: str) -> list[tuple[str, ...]]:
    """Expand a grouping expression: ``a/b`` → [(a,), (a, b)]; ``a:b`` → [(a, b)]."""
    group = group.strip()
    if not group:
        raise FormulaError(f"random-effect term ({bar}) has no grouping factor after '|'")
    nests = [p.strip() for _, p in split_top_level(group, "/")]
    out, prefix = [], ()
    for nest in nests:
        raw = [f.strip() for _, f in split_top_level(nest, ":")]
        for f in raw:
            if not f or not _NAME.match(f):
                raise FormulaError(
                    f"grouping factor {f!r} in ({bar}) must be a column name (use a:b for interactions, a/b for "
                    "nesting; quote other names with backticks, e.g. `my g`)"
                )
        factors = tuple(f[1:-1] if f.startswith("`") else f for f in raw)  # `my g` -> column "my g"
        prefix = prefix + factors
        out.append(prefix)
    return out


def _parse_bar(inner: str) -> list[BarTerm]:
    """Parse the inside of one ``( ... | ... )`` term into expanded BarTerms."""
    parts = [p for _, p in split_top_level(inner, "|")]  # a '|' inside backticks (`a|b`) is part of a name
    if len(parts) == 2:
        correlated = True
    elif len(parts) == 3 and parts[1] == "":
        correlated = False  # ||
    else:
        raise FormulaError(f"malformed random-effect term ({inner}): write (expr | group) or (expr || group); "
                           "quote a column name containing '|' with backticks, e.g. (1 | `a|b`)")
    expr, group = parts[0].strip(), parts[-1]
    if not expr:
        raise FormulaError(f"random-effect term ({inner}) has no expression before '|' (write (1 | g) for intercepts)")
    expr = r_habits(expr)
    return [
        BarTerm(expr=expr, group=":".join(factors), factors=factors, correlated=correlated)
        for factors in _parse_group(group, inner)
    ]


_FACTOR = re.compile(r"(?<![\w.])(?:as\.)?factor\s*\(")
_OFFSET = re.compile(r"(?<![\w.])offset\s*\(")


def _offset_arg(term: str) -> str | None:
    """The argument of a term that is exactly ``offset(<expr>)``, else None."""
    m = re.match(r"offset\s*(?=\()", term)
    return None if m is None else _strip_outer_parens(term[m.end():])


def r_habits(expr: str) -> str:
    """Translate R formula habits to formulaic: ``^`` inside a function call (``I(x^2)``, ``log(x^2)``) is R's
    power, ``**`` in Python (formulaic would evaluate Python's XOR); ``factor(x)`` / ``as.factor(x)`` is ``C(x)``.
    ``^`` outside calls keeps its formula meaning (``(a + b)^2``: interactions up to order 2), as in R.
    ``offset(x)`` anywhere but as a top-level term of the fixed part (``y ~ x + offset(log(t))``, handled by
    ``parse_formula``) raises a FormulaError.

    >>> r_habits("I(Days^2) + factor(g) + (a + b)^2")
    'I(Days**2) + C(g) + (a + b)^2'
    """
    if _OFFSET.search(expr):
        raise FormulaError(f"offset() in {expr!r}: an offset must be a top-level term of the fixed part, "
                           "e.g. 'y ~ x + offset(log(t)) + (1 | g)' (not inside a random-effect term, another "
                           "function, an interaction or the sigma formula)")
    expr = _FACTOR.sub("C(", expr)
    out, stack, quote = [], [], None  # stack: True for a function call's parentheses, False for grouping
    for i, ch in enumerate(expr):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            j = i - 1
            while j >= 0 and expr[j] == " ":
                j -= 1
            stack.append(j >= 0 and (expr[j].isalnum() or expr[j] in "_."))
        elif ch == ")":
            if stack:
                stack.pop()
        elif ch == "^" and any(stack):
            out.append("**")
            continue
        out.append(ch)
    return "".join(out)


def parse_formula(formula: str) -> FormulaSpec:
    """Split an lme4 formula into response, fixed part and expanded bar terms (formula order).

    Bar terms must be top-level additive terms, each in its own parentheses, as in lme4.
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    sides = split_top_level(formula, "~")
    if len(sides) != 2 or not sides[0][1].strip():
        raise FormulaError(f"formula {formula!r} must have exactly one '~' with a response on its left")
    response, rhs = sides[0][1].strip(), sides[1][1].strip()
    response, failures = _cbind(response)
    if not rhs:
        raise FormulaError(f"formula {formula!r} has an empty right-hand side")
    fixed_parts, bars, offsets = [], [], []
    for pos, (sign, term) in enumerate(split_top_level(rhs, "+-")):
        if not term.strip():
            if pos == 0 and rhs.lstrip().startswith(("-", "+")):
                continue  # leading sign, as in "y ~ -1 + x"
            raise FormulaError(f"empty term in right-hand side {rhs!r}")
        inner = _strip_outer_parens(term)
        if inner is not None and len(split_top_level(inner, "|")) > 1:
            if sign == "-":
                raise FormulaError(f"random-effect term ({inner}) cannot be subtracted")
            bars.extend(_parse_bar(inner))
        elif "|" in _unquoted(term):
            raise FormulaError(f"'|' outside a parenthesized random-effect term in {term.strip()!r}")
        elif _offset_arg(term.strip()) is not None:
            if sign == "-":
                raise FormulaError(f"offset term {term.strip()!r} cannot be subtracted (write offset(-x))")
            # an R arithmetic expression: translated as the argument of a call (t^2 is a power)
            offsets.append(r_habits(f"I({_offset_arg(term.strip()).strip()})")[2:-1])
        else:
            fixed_parts.append((sign, term.strip()))
    fixed = "".join(f" {s} {t}" if s else t for s, t in fixed_parts).strip()
    if not fixed or fixed.startswith(("+", "-")):
        # "y ~ (1|g)" or "y ~ (1|g) - 1": lme4 implies the intercept unless it is removed
        fixed = f"1 {fixed}".strip()
    return FormulaSpec(formula=formula, response=r_habits(response), fixed=r_habits(fixed), bars=tuple(bars),
                       offsets=tuple(offsets), failures=None if failures is None else r_habits(f"I({failures})")[2:-1])


_CBIND = re.compile(r"^cbind\s*\((.*)\)$", re.S)


def _cbind(response: str) -> tuple[str, str | None]:
    """lme4's binomial response ``cbind(successes, failures)`` -> (successes, failures); else (response, None)."""
    m = _CBIND.match(response)
    if m is None:
        return response, None
    args = [a.strip() for _, a in split_top_level(m.group(1), ",")]
    if len(args) != 2 or not all(args):
        raise FormulaError(f"cbind() in the response {response!r} takes two arguments: "
                           "cbind(successes, failures), e.g. cbind(incidence, size - incidence)")
    return args[0], args[1]
