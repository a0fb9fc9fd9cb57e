"""lme4 point estimates (ML) for the plain-LMM experiments, next to lmmarg's posterior means.

    python -m benchmarks.peers_lme4 [--experiments dillonE1,dutch]

Needs Rscript with lme4 (skipped with a message otherwise). Lognormal models are fitted to log(y). Writes
benchmarks/results/lme4.csv and lme4.md (fixed effects, SDs, residual SD, logLik, fit time inside R).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd

from .experiments import EXPERIMENTS, build_model
from .harness import RESULTS, to_markdown

R_SCRIPT = r"""
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], stringsAsFactors = FALSE)
for (f in strsplit(args[3], ",")[[1]]) if (nchar(f)) d[[f]] <- factor(d[[f]])
t0 <- proc.time()[["elapsed"]]
m <- lmer(as.formula(args[2]), data = d, REML = FALSE,
          control = lmerControl(calc.derivs = FALSE))
el <- proc.time()[["elapsed"]] - t0
fe <- fixef(m)
vc <- as.data.frame(VarCorr(m))
out <- data.frame(param = c(paste0("b_", names(fe)),
                            ifelse(is.na(vc$var2), paste0("sd_", vc$grp, "__", vc$var1),
                                   paste0("cor_", vc$grp, "__", vc$var1, "__", vc$var2))),
                  value = c(unname(fe), vc$sdcor))
out$value[out$param == "sd_Residual__NA"] <- sigma(m)
out$param[out$param == "sd_Residual__NA"] <- "sigma"
out <- rbind(out, data.frame(param = c("logLik", "fit_seconds"), value = c(as.numeric(logLik(m)), el)))
write.csv(out, args[4], row.names = FALSE)
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiments", default="all")
    a = ap.parse_args(argv)
    if shutil.which("Rscript") is None:
        print("Rscript not found: skipping lme4", file=sys.stderr)
        return None
    names = list(EXPERIMENTS) if a.experiments == "all" else a.experiments.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rfile = os.path.join(tmp, "fit.R")
        open(rfile, "w").write(R_SCRIPT)
        for name in names:
            exp = EXPERIMENTS[name]
            if exp.custom:
                rows.append(dict(experiment=name, param="(skipped)", value=float("nan"),
                                 note="residual scale model not expressible in lme4"))
                continue
            df = exp.data()
            resp = exp.formula.split("~")[0].strip()
            formula = exp.formula
            if exp.family == "lognormal":
                formula = f"log({resp}) ~" + exp.formula.split("~", 1)[1]
            factors = sorted({f for t in build_model(exp).terms for f in t.factors})
            data = os.path.join(tmp, f"{name}.csv")
            df.to_csv(data, index=False)
            out = os.path.join(tmp, f"{name}_out.csv")
            p = subprocess.run(["Rscript", rfile, data, formula, ",".join(factors), out], capture_output=True,
                               text=True, timeout=1800)
            if p.returncode:
                rows.append(dict(experiment=name, param="(error)", value=float("nan"), note=p.stderr[-200:]))
                continue
            res = pd.read_csv(out)
            for _, r in res.iterrows():
                rows.append(dict(experiment=name, param=r["param"], value=r["value"], note=""))
            print(name, "done", flush=True)
    df = pd.DataFrame(rows)
    os.makedirs(RESULTS, exist_ok=True)
    df.to_csv(os.path.join(RESULTS, "lme4.csv"), index=False)
    with open(os.path.join(RESULTS, "lme4.md"), "w") as f:
        f.write("# lme4 ML estimates (lognormal models on log y)\n\n"
                + to_markdown(df, ["experiment", "param", "value", "note"], ".5g") + "\n")
    return df


if __name__ == "__main__":
    main()
