"""docs/api.md, the API reference, is what docs/make_api.py writes from the docstrings, and it covers lmmarg's exports.

When test_api_page_is_current fails, regenerate the page: ``.venv/bin/python docs/make_api.py``.
"""
import inspect
import pathlib
import runpy

import pytest

import lmmarg

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "api.md"


@pytest.fixture(scope="module")
def generator() -> dict:
    """The generator script's namespace (run as a file: docs/ is not a package)."""
    return runpy.run_path(str(ROOT / "docs" / "make_api.py"))


def test_api_page_is_current(generator):
    ok, summary = generator["check"](PAGE)
    assert ok, summary + "\nregenerate it: .venv/bin/python docs/make_api.py"


def test_top_level_exports_are_documented():
    page = PAGE.read_text()
    top = page[page.index('<a id="lmmarg"></a>'):page.index('<a id="lmmarg.model"></a>')]
    exported = [n for n in lmmarg.__all__ if inspect.isclass(obj := getattr(lmmarg, n)) or inspect.isfunction(obj)]
    assert {"Model", "Fit", "load", "compare"} <= set(exported)
    for name in exported:
        obj = getattr(lmmarg, name)
        where = f"{obj.__module__}.{obj.__qualname__}"
        assert f"- `{name}` -> [`{where}`](#{where})" in top, name            # listed under the top-level exports
        kind = "class" if inspect.isclass(obj) else "function"
        section = page[page.index(f'<a id="{where}"></a>\n\n### {kind} `{where}`'):]                 # documented
        assert f"```py\n{obj.__name__}" in section[:section.index("```text")], name          # with its signature


def test_module_that_fails_to_import_is_listed_not_fatal(generator):
    own, reexports, error, module = generator["document"]("lmmarg.no_such_module")
    assert module is None and own == reexports == [] and error.startswith("ModuleNotFoundError")


def test_reading_order(generator):
    rank = generator["rank"]
    names = ["lmmarg.codes", "lmmarg.marginal.plan", "lmmarg.model", "lmmarg", "lmmarg.zz_new", "lmmarg.results.zz_new"]
    assert sorted(names, key=rank) == ["lmmarg", "lmmarg.model", "lmmarg.results.zz_new", "lmmarg.marginal.plan",
                                       "lmmarg.codes", "lmmarg.zz_new"]
