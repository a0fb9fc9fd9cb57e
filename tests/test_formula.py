"""Parsing of lme4 formula syntax (bars, double bars, nesting, interactions, fixed part handed to formulaic)."""
import pytest

from lmmarg.formula import FormulaError, parse_formula


def bars(f):
    return [(b.expr, b.group, b.correlated) for b in parse_formula(f).bars]


def test_single_bar_and_fixed_part():
    s = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert s.response == "Reaction" and s.fixed == "Days"
    assert bars(s.formula) == [("Days", "Subject", True)]


def test_transformed_response_and_formulaic_fixed_syntax():
    s = parse_formula("log(rt) ~ C(cond) + I(x**2) + {x + 1} + a:b + (cond | subj) + (cond | item)")
    assert s.response == "log(rt)"
    assert s.fixed == "C(cond) + I(x**2) + {x + 1} + a:b"
    assert bars(s.formula) == [("cond", "subj", True), ("cond", "item", True)]


def test_double_bar_is_uncorrelated():
    assert bars("y ~ x + (1 + x || g)") == [("1 + x", "g", False)]


def test_slash_expands_to_outer_and_interaction():
    s = parse_formula("strength ~ 1 + (1 | batch/cask)")
    assert [(b.group, b.factors) for b in s.bars] == [("batch", ("batch",)), ("batch:cask", ("batch", "cask"))]
    assert [b.group for b in parse_formula("y ~ (1|a/b/c)").bars] == ["a", "a:b", "a:b:c"]


def test_interaction_grouping():
    (b,) = parse_formula("y ~ (1 | dept:service)").bars
    assert b.group == "dept:service" and b.factors == ("dept", "service")


def test_intercept_handling():
    assert parse_formula("y ~ (1|g)").fixed == "1"
    assert parse_formula("y ~ (1|g) - 1").fixed == "1 - 1"
    assert parse_formula("y ~ 0 + x + (0 + x | g)").fixed == "0 + x"
    assert parse_formula("y ~ -1 + x + (1|g)").fixed == "1 - 1 + x"
    assert bars("y ~ x + (0 + x | g)") == [("0 + x", "g", True)]


@pytest.mark.parametrize("bad, msg", [
    ("y ~ x + (1 | )", "no grouping factor"),
    ("y ~ x + ( | g)", "no expression"),
    ("y ~ x + (1 | g", "unbalanced"),
    ("y ~ x + 1 | g)", "unbalanced"),
    ("y ~ x | g", "outside a parenthesized"),
    ("~ x", "exactly one '~'"),
    ("y ~ ", "empty right-hand side"),
    ("y ~ x + + z", "empty term"),
    ("y ~ x - (1 | g)", "cannot be subtracted"),
    ("y ~ x + (1 | g + h)", "must be a column name"),
    ("y ~ x + (1 | a | b)", "malformed"),
])
def test_malformed_formulas_raise_clear_errors(bad, msg):
    with pytest.raises(FormulaError, match=msg):
        parse_formula(bad)


def test_non_string_formula():
    with pytest.raises(FormulaError, match="must be a string"):
        parse_formula(42)
