"""Every Python example of the README and docs/ runs as written (guide section 10 runs in test_workflow.py).

Sampling calls are capped at 2 chains x 100 + 100 iterations: the examples' arguments are accepted unchanged, only
the run is shorter, so the suite stays fast; everything else executes exactly as printed.
"""
import pathlib
import re
import warnings

import matplotlib
import pytest

import lmmarg

matplotlib.use("Agg")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(path: pathlib.Path, stop: str | None = None) -> list[str]:
    text = path.read_text()
    if stop is not None:
        text = text[:text.index(stop)]
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture
def short_sampling(monkeypatch):
    original = lmmarg.Model.sample

    def capped(self, *args, **kwargs):
        kwargs.update(draws=min(kwargs.get("draws", 1000), 100), warmup=min(kwargs.get("warmup", 1000), 100),
                      chains=min(kwargs.get("chains", 4), 2), progress_bar=False)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lmmarg.Model, "sample", capped)


def _run(blocks, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short runs: SamplerWarnings
        for code in blocks:
            if "use_cores(" in code:   # sets JAX's devices, which must happen before JAX starts: a fresh process
                _run_fresh(code, where)
                continue
            exec(compile(code, where, "exec"), ns)
    return ns


def _run_fresh(code: str, where: str):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{where}: {p.stderr[-2000:]}"
    expected = re.findall(r"print\(.*\)\s+#\s*(\S+)", code)   # the values the comments promise
    assert p.stdout.split() == expected, (where, p.stdout, expected)


@pytest.mark.parametrize("doc", ["README.md", "docs/formula.md", "docs/math.md", "docs/glmm.md"])
def test_examples_run(doc, short_sampling, tmp_path, monkeypatch):
    blocks = _blocks(ROOT / doc)
    assert blocks, doc
    _run(blocks, doc, tmp_path, monkeypatch)


def test_guide_sections_1_to_9_run(short_sampling, tmp_path, monkeypatch):
    blocks = _blocks(ROOT / "docs" / "guide.md", stop="## 10. The brms workflow")
    assert len(blocks) >= 10
    ns = _run(blocks, "docs/guide.md", tmp_path, monkeypatch)
    assert ns["effects"]["u_Subject"].shape[-2:] == (18, 2)   # the drop-in NumPyro example recovered the effects
    assert ns["yrep"].shape[-1] == 3
    assert ns["fit_b"].diagnostics["marginalize_beta"] and ns["fit_b"].samples["beta"].shape[-1] == 2
