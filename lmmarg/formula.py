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

__all__ = ["FormulaError", "BarTerm", "FormulaSpec", "parse_formula", "split_top_level"]


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


_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$|^`[^`]+`$")


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
    nests = [p.strip() for p in group.split("/")]
    out, prefix = [], ()
    for nest in nests:
        factors = tuple(f.strip().strip("`") for f in nest.split(":"))
        for f in factors:
            if not f or not _NAME.match(f):
                raise FormulaError(
                    f"grouping factor {f!r} in ({bar}) must be a column name (use a:b for interactions, a/b for nesting)"
                )
        prefix = prefix + factors
        out.append(prefix)
    return out


def _parse_bar(inner: str) -> list[BarTerm]:
    """Parse the inside of one ``( ... | ... )`` term into expanded BarTerms."""
    m = re.match(r"^(?P<expr>[^|]*)(?P<bar>\|\|?)(?P<group>[^|]*)$", inner, re.S)
    if m is None:
        raise FormulaError(f"malformed random-effect term ({inner})")
    expr = m.group("expr").strip()
    if not expr:
        raise FormulaError(f"random-effect term ({inner}) has no expression before '|' (write (1 | g) for intercepts)")
    correlated = m.group("bar") == "|"
    return [
        BarTerm(expr=expr, group=":".join(factors), factors=factors, correlated=correlated)
        for factors in _parse_group(m.group("group"), inner)
    ]


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
    if not rhs:
        raise FormulaError(f"formula {formula!r} has an empty right-hand side")
    fixed_parts, bars = [], []
    for pos, (sign, term) in enumerate(split_top_level(rhs, "+-")):
        if not term.strip():
            if pos == 0 and rhs.lstrip().startswith(("-", "+")):
                continue  # leading sign, as in "y ~ -1 + x"
            raise FormulaError(f"empty term in right-hand side {rhs!r}")
        inner = _strip_outer_parens(term)
        if inner is not None and "|" in inner:
            if sign == "-":
                raise FormulaError(f"random-effect term ({inner}) cannot be subtracted")
            bars.extend(_parse_bar(inner))
        elif "|" in term:
            raise FormulaError(f"'|' outside a parenthesized random-effect term in {term.strip()!r}")
        else:
            fixed_parts.append((sign, term.strip()))
    fixed = "".join(f" {s} {t}" if s else t for s, t in fixed_parts).strip()
    if not fixed or fixed.startswith(("+", "-")):
        # "y ~ (1|g)" or "y ~ (1|g) - 1": lme4 implies the intercept unless it is removed
        fixed = f"1 {fixed}".strip()
    return FormulaSpec(formula=formula, response=response, fixed=fixed, bars=tuple(bars))
