"""ML fits of typical models: wall time (Model + fit_ml, cold; and a refit), criterion evaluations, deviance and
convergence, optionally side by side with another lmmarg checkout (e.g. a git worktree of an older commit).

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.ml_models [--ref /path/to/other/checkout] [--repeats 2]

Each (checkout, repeat) runs in its own process, alternating, so that both see the same machine load. A process
imports the lmmarg of its checkout because it runs `python -c` there (the working directory comes first on
sys.path, before the installed lmmarg); it checks that it did.
Writes benchmarks/results/ml_models.md.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
CASES = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", "lmmarg:sleepstudy"),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "lmmarg:penicillin"),
    ("dillonE1", "log(rt) ~ int + (int | subj) + (int | item)", "dillonE1.csv"),
    ("english", "NP1 ~ condition + (condition | subject) + (condition | item)", "english.csv"),
    ("pupil", "p_size ~ load + (load | subj)", "pupil_complete.csv"),
    ("fibrosis", "FVC ~ 1 + Weeks + (1 + Weeks || Patient)", "fibrosis.csv"),
    ("eeg", "n400 ~ cloze + (cloze | subj) + (cloze | item)", "eeg_complete.csv"),
]

WORKER = r"""
import json, os, sys, time, warnings
import pandas as pd
import lmmarg
if not os.path.realpath(lmmarg.__file__).startswith(os.path.join(os.path.realpath(sys.argv[1]), "")):
    sys.exit(f"imported lmmarg from {lmmarg.__file__}, not from the checkout {sys.argv[1]}")
warnings.simplefilter("ignore")
out = {}
for name, formula, src in json.loads(sys.argv[2]):
    if src.startswith("lmmarg:"):
        data = lmmarg.datasets.load(src.split(":")[1])
    else:
        data = pd.read_csv(sys.argv[3] + "/" + src)
    t = time.perf_counter(); m = lmmarg.Model(formula, data); fit = m.fit_ml(); cold = time.perf_counter() - t
    t = time.perf_counter(); m.fit_ml(); warm = time.perf_counter() - t
    out[name] = dict(cold_s=cold, refit_s=warm, n_eval=fit.n_eval, deviance=-2 * (fit.loglik - m.log_jacobian),
                     converged=bool(fit.converged))
print(json.dumps(out))
"""


def run(checkout: str) -> dict:
    """One worker process in `checkout` (a repository root): {model: dict of cold_s, refit_s, n_eval, ...}."""
    p = subprocess.run([sys.executable, "-c", WORKER, checkout, json.dumps(CASES), str(HERE / "data")],
                       capture_output=True, text=True, cwd=checkout)
    if p.returncode:
        raise RuntimeError(f"ml_models worker in {checkout} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=None, help="another lmmarg checkout to compare with (its root folder)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    here = str(HERE.parent)
    runs = {"this": [], "ref": []}
    for _ in range(a.repeats):
        runs["this"].append(run(here))
        if a.ref:
            runs["ref"].append(run(a.ref))
    med = {k: {c[0]: {f: sorted(r[c[0]][f] for r in v)[len(v) // 2] for f in v[0][c[0]]} for c in CASES}
           for k, v in runs.items() if v}
    head = "| model | cold (s) | refit (s) | evaluations | deviance | converged |"
    lines = ["# ML fits of typical models (Model + fit_ml)", "", "Median of %d alternating runs; cold = Model() + "
             "first fit_ml (design, plan, compilation, optimization, checks); refit = second fit_ml." % a.repeats, ""]
    if a.ref:
        head = ("| model | cold (s) ref → this | refit (s) ref → this | evaluations ref → this | deviance ref → this "
                "| converged |")
        rev = subprocess.run(["git", "-C", a.ref, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        this = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        lines += [f"ref = commit {rev.stdout.strip() or a.ref}, this = commit {this.stdout.strip() or here}", ""]
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, _, _ in CASES:
        t = med["this"][name]
        if a.ref:
            r = med["ref"][name]
            lines.append(f"| {name} | {r['cold_s']:.2f} → {t['cold_s']:.2f} | "
                         f"{r['refit_s']:.3f} → {t['refit_s']:.3f} | "
                         f"{r['n_eval']} → {t['n_eval']} | {r['deviance']:.4f} → {t['deviance']:.4f} | "
                         f"{t['converged']} |")
        else:
            lines.append(f"| {name} | {t['cold_s']:.2f} | {t['refit_s']:.3f} | {t['n_eval']} | {t['deviance']:.4f} | "
                         f"{t['converged']} |")
    (HERE / "results" / "ml_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
