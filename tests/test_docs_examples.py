"""Every Python example of the README and docs/ runs as written (guide section 10 runs in test_workflow.py).

Sampling calls are capped at 2 chains x (50 warmup + 100 draws) iterations, and at 5 + 5 on data of more than
10,000 rows (the guide's crossed N = 20,000 example: early-warmup trajectories there are hundreds of gradients of
20,000 rows each, so even 30 + 30 iterations took a fifth of this module's time): the examples' arguments are accepted
unchanged, only the run is shorter, so the suite stays fast; everything else executes exactly as printed (100 draws per
chain: guide section 7 predicts 200 draws of 2 chains). NumPyro's own ``MCMC`` (the guide's drop-in example) gets the
same caps on warmup and draws, without a progress bar; an example that must start a fresh interpreter
(``use_cores``) runs with the same ``sample()`` caps, set before its code.

The examples fit a dozen model structures, some several times (sleepstudy in the README and guide sections 1, 7 and
8): this module keeps the compiled programs of every structure (``_keep_programs``) instead of lmmarg's bounded
defaults, so a structure met again is not traced and compiled again.
"""
import pathlib
import re
import warnings

import matplotlib
import pytest

import lmmarg
from lmmarg.compile import limits, programs

matplotlib.use("Agg")
ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_CHAINS, MAX_WARMUP, MAX_DRAWS = 2, 50, 100     # the caps of every sample() call (module docstring)
LARGE_ROWS, LARGE_CAP = 10_000, 5                  # ... and of warmup and draws on data of more rows


def _blocks(path: pathlib.Path, stop: str | None = None) -> list[str]:
    text = path.read_text()
    if stop is not None:
        text = text[:text.index(stop)]
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture(autouse=True, scope="module")
def _keep_programs():
    """For this module: every structure's programs stay shared (``PROGRAM_CACHE_SIZE``) and lmmarg never releases
    its compiled caches on its own (``MAX_COMPILED_STRUCTURES = 0``; the suite's conftest still releases them after
    the module when the process holds many memory mappings)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(programs, "PROGRAM_CACHE_SIZE", 64)
    patch.setattr(limits, "MAX_COMPILED_STRUCTURES", 0)
    yield
    patch.undo()


# The caps as code: run here (``short_sampling``) and before an example that starts a fresh interpreter (``_run_fresh``)
CAPS = f"""
import lmmarg as _lmmarg


def _capped(sample):
    def capped(self, *args, **kwargs):
        large = self.n_obs > {LARGE_ROWS}
        kwargs.update(draws=min(kwargs.get("draws", 1000), {LARGE_CAP} if large else {MAX_DRAWS}),
                      warmup=min(kwargs.get("warmup", 1000), {LARGE_CAP} if large else {MAX_WARMUP}),
                      chains=min(kwargs.get("chains", 4), {MAX_CHAINS}), progress_bar=False)
        return sample(self, *args, **kwargs)
    return capped
"""


@pytest.fixture
def short_sampling(monkeypatch):
    import numpyro.infer

    caps: dict = {}
    exec(CAPS, caps)
    monkeypatch.setattr(lmmarg.Model, "sample", caps["_capped"](lmmarg.Model.sample))

    class CappedMCMC(numpyro.infer.MCMC):
        def __init__(self, sampler, *, num_warmup, num_samples, **kwargs):
            super().__init__(sampler, num_warmup=min(num_warmup, MAX_WARMUP), num_samples=min(num_samples, MAX_DRAWS),
                             **{**kwargs, "progress_bar": False})

    monkeypatch.setattr(numpyro.infer, "MCMC", CappedMCMC)


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
    capped = f"{CAPS}\n_lmmarg.Model.sample = _capped(_lmmarg.Model.sample)\n"   # imports lmmarg, starts no JAX
    p = subprocess.run([sys.executable, "-c", capped + code], capture_output=True, text=True, timeout=600)
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
