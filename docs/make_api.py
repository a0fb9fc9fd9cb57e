"""Write docs/api.md, the API reference, from the docstrings of lmmarg's modules.

Run from the repository root: ``.venv/bin/python docs/make_api.py`` writes docs/api.md;
``.venv/bin/python docs/make_api.py --check`` exits 1 (with a short diff summary) when docs/api.md is out of date.

Modules come in a curated reading order (user API, engine, the rest); any module the walk finds that the order does
not name goes at the end, sorted. Private modules (``_x``) are skipped. A module that fails to import is listed with
its error. Per module: its docstring, then the public classes (with their public methods and properties) and
functions defined in it -- the names in ``__all__`` when it is defined, else the names without a leading underscore
-- each with its signature and its docstring verbatim (text blocks: the docstrings' line breaks state shapes).
Names that ``__all__`` takes from other modules are listed as re-exports with a link.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import pathlib
import pkgutil
import re
import sys
import typing

OUT = pathlib.Path(__file__).resolve().parent / "api.md"
ROOT = OUT.parent.parent
GROUPS = [  # (title, modules in reading order; "pkg.*" = that package's other submodules, sorted)
    ("User API", ["lmmarg", "lmmarg.model", "lmmarg.results", "lmmarg.results.fit", "lmmarg.results.ml",
                  "lmmarg.results.predict", "lmmarg.results.loo", "lmmarg.results.plots", "lmmarg.results.*",
                  "lmmarg.inference", "lmmarg.inference.nuts", "lmmarg.inference.mapvi", "lmmarg.inference.ml",
                  "lmmarg.inference.*", "lmmarg.priors", "lmmarg.families", "lmmarg.saving", "lmmarg.datasets",
                  "lmmarg.parameters", "lmmarg.compile", "lmmarg.compile.*"]),
    ("Engine", ["lmmarg.marginal", "lmmarg.marginal.plan", "lmmarg.marginal.structure", "lmmarg.marginal.statistics",
                "lmmarg.marginal.blocks", "lmmarg.marginal.linalg", "lmmarg.marginal.kernels",
                "lmmarg.marginal.laplace", "lmmarg.marginal.conditional", "lmmarg.marginal.*"]),
    ("Other modules", ["lmmarg.design", "lmmarg.formula", "lmmarg.potential", "lmmarg.numpyro_model",
                       "lmmarg.distributions", "lmmarg.degenerate", "lmmarg.diagnostics", "lmmarg.codes"]),
]
ORDER = [m for _, mods in GROUPS for m in mods]
GROUP = [title for title, mods in GROUPS for _ in mods] + ["Other modules"]  # GROUP[rank(name)[0]]
WIDTH = 110  # longer signatures are written one parameter a line


def clean(text: str) -> str:
    """Deterministic text: no memory addresses, no absolute paths of this checkout."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text).replace(str(ROOT) + "/", "")


def rank(name: str) -> tuple[int, str]:
    if name in ORDER:
        return ORDER.index(name), name
    wild = [i for i, p in enumerate(ORDER) if p.endswith(".*") and name.startswith(p[:-1])]
    return (wild[0] if wild else len(ORDER)), name


def discover() -> list[str]:
    path = importlib.util.find_spec("lmmarg").submodule_search_locations  # not imported here: it may fail
    names = {"lmmarg"} | {m.name for m in pkgutil.walk_packages(path, "lmmarg.", onerror=lambda n: None)}
    return sorted((n for n in names if not any(p.startswith("_") for p in n.split("."))), key=rank)


def docblock(doc: str | None) -> list[str]:
    if not doc or not doc.strip():
        return ["*(no docstring)*", ""]
    doc = clean(inspect.cleandoc(doc))
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", doc)), default=0))
    return [fence + "text", doc, fence, ""]


class _Ann(str):
    """An annotation shown as its source text, unquoted (``from __future__ import annotations`` keeps strings)."""
    __repr__ = str.__str__


def signature(name: str, obj, drop_first: bool = False) -> list[str]:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ["```py", name, "```", ""]
    ann = (lambda a: _Ann(getattr(a, "__forward_arg__", a)) if isinstance(a, (str, typing.ForwardRef)) else a)
    params = [p.replace(annotation=ann(p.annotation)) for p in sig.parameters.values()][int(drop_first):]
    sig = sig.replace(parameters=params, return_annotation=ann(sig.return_annotation))
    text = clean(name + str(sig))
    if len(text) > WIDTH:   # one parameter a line, with Python's own "/" and "*" markers
        parts, kinds = [], [p.kind for p in params]
        for i, p in enumerate(params):
            first_kw = p.kind == p.KEYWORD_ONLY and (i == 0 or kinds[i - 1] != p.KEYWORD_ONLY)
            if first_kw and p.VAR_POSITIONAL not in kinds:
                parts.append("*")
            parts.append(clean(str(p)))
            if p.kind == p.POSITIONAL_ONLY and (i + 1 == len(params) or kinds[i + 1] != p.POSITIONAL_ONLY):
                parts.append("/")
        ret = "" if sig.return_annotation is sig.empty else " -> " + clean(inspect.formatannotation(
            sig.return_annotation))
        text = name + "(\n" + "".join(f"    {s},\n" for s in parts) + ")" + ret
    return ["```py", text, "```", ""]


def members(cls) -> list[tuple[str, str, object]]:
    """(kind, name, object) of the public methods and properties ``cls`` itself defines, in source order."""
    out = []
    for name, attr in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(attr, (property, functools.cached_property)):
            out.append(("property", name, attr))
        elif isinstance(attr, (staticmethod, classmethod)):
            out.append((type(attr).__name__, name, attr.__func__))
        elif inspect.isfunction(attr) or (callable(attr) and hasattr(attr, "__wrapped__")):
            out.append(("method", name, attr))
    return out


def document(modname: str) -> tuple[list[tuple[str, object]], list[tuple[str, object]], str | None, object]:
    """(own objects, re-exported names, import error, module) of one module."""
    try:
        mod = importlib.import_module(modname)
    except Exception as e:  # noqa: BLE001 -- the page lists the failure instead of stopping
        return [], [], clean(f"{type(e).__name__}: {e}"), None
    public = getattr(mod, "__all__", None)
    names = list(public) if public is not None else sorted(n for n in vars(mod) if not n.startswith("_"))
    own, reexports = [], []
    for n in names:
        obj = getattr(mod, n, None)
        if inspect.ismodule(obj) or (callable(obj) and getattr(obj, "__module__", None) != modname):
            if public is not None:
                reexports.append((n, obj))
        elif callable(obj) or public is not None:
            own.append((n, obj))
    return own, reexports, None, mod


def first_sentence(doc: str | None) -> str:
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    return para.split(". ")[0].rstrip(".") + "." if para else ""


def constant(name: str, obj) -> str:
    """``name = repr`` for plain values; ``name: type`` for others (their reprs may hold state, e.g. a lock)."""
    plain = (bool, int, float, complex, str, bytes, type(None))
    if isinstance(obj, frozenset) and all(isinstance(v, str) for v in obj):   # sorted: set order follows the hash seed
        return f"{name} = frozenset({sorted(obj)!r})"[:WIDTH]
    if isinstance(obj, plain) or (isinstance(obj, tuple) and all(isinstance(v, plain) for v in obj)):
        return clean(f"{name} = {obj!r}")[:WIDTH]
    return f"{name}: {type(obj).__module__}.{type(obj).__qualname__}".replace("builtins.", "")


def target(obj) -> str:
    return obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{obj.__qualname__}".removeprefix("builtins.")


def render() -> str:
    mods = {m: document(m) for m in discover()}
    anchors = {m for m in mods} | {f"{m}.{n}" for m, (own, *_) in mods.items() for n, o in own if callable(o)}
    toc, body, group = [], [], None
    for m, (own, reexports, error, mod) in mods.items():
        if GROUP[rank(m)[0]] != group:
            group = GROUP[rank(m)[0]]
            toc += ["", f"**{group}**", ""]
        summary = "import failed" if error else first_sentence(mod.__doc__)
        toc.append(f"- [`{m}`](#{m}){' -- ' + clean(summary) if summary else ''}")
        body += [f'<a id="{m}"></a>', "", f"## `{m}`", ""]
        if error:
            body += ["**Import failed:**", "", "```text", error, "```", ""]
            continue
        body += docblock(mod.__doc__)
        if reexports:
            body += ["Re-exports:", ""] + [f"- `{n}` -> " + (f"[`{target(o)}`](#{target(o)})" if target(o) in anchors
                                                              else f"`{target(o)}`") for n, o in reexports] + [""]
        constants = [(n, o) for n, o in own if not callable(o)]
        if constants:
            body += ["Constants:", "", "```py"] + [constant(n, o) for n, o in constants] + ["```", ""]
        for n, obj in own:
            if not callable(obj):
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            body += [f'<a id="{m}.{n}"></a>', "", f"### {kind} `{m}.{n}`", ""]
            if inspect.isclass(obj):
                bases = [target(b) for b in obj.__bases__ if b is not object]
                body += [f"Bases: {', '.join(f'`{b}`' for b in bases)}", ""] if bases else []
            body += signature(n, obj) + docblock(obj.__doc__)
            for kind, name, attr in members(obj) if inspect.isclass(obj) else []:
                body += [f"#### {kind} `{n}.{name}`", ""]
                if kind == "property":   # its type, when annotated
                    try:
                        ret = inspect.signature(getattr(attr, "fget", None) or attr.func).return_annotation
                    except (AttributeError, TypeError, ValueError):
                        ret = inspect.Signature.empty
                    ret = ret if isinstance(ret, str) else inspect.formatannotation(ret)
                    body += [] if ret == "inspect._empty" else ["```py", f"{n}.{name}: {ret}", "```", ""]
                else:
                    body += signature(f"{n}.{name}", attr, drop_first=kind != "staticmethod")
                body += docblock(attr.__doc__)
    head = ["# lmmarg API reference", "",
            "Generated from the docstrings by `docs/make_api.py`; do not edit by hand. Regenerate with",
            "`.venv/bin/python docs/make_api.py` (`--check` tells whether this page is current).", "",
            "## Contents"]
    return "\n".join(head + toc + ["", "---", ""] + body).rstrip() + "\n"


def check(path: pathlib.Path = OUT) -> tuple[bool, str]:
    """(whether ``path`` holds what render() writes, a short diff summary)."""
    new = render()
    old = path.read_text() if path.exists() else ""
    if old == new:
        return True, f"{path.name} is current"
    diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), "on disk", "generated", n=0, lineterm=""))
    changed = sum(1 for d in diff[2:] if d[:1] in "+-" and d[:3] not in ("+++", "---"))
    return False, "\n".join([f"{path.name} is out of date ({changed} lines differ); first differences:"] + diff[:20])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        ok, summary = check()
        print(summary)
        return 0 if ok else 1
    if argv:
        print(__doc__)
        return 2
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
