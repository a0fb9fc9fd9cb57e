#!/usr/bin/env Rscript
## Best lme4 optimum over its optimizers, for the "never stop short" ML/REML tests (tests/test_ml_optima.py).
##
## Usage:  Rscript tests/golden/make_lme4_optima.R [DATA_DIR] [OUT_JSON]
##   DATA_DIR: folder with the CSVs (defaults to ../../../shared/data relative to this script)
##   OUT_JSON: defaults to lme4_optima.json next to this script.
##
## Every model is fitted by ML and REML with each of lme4's optimizers (bobyqa, Nelder_Mead, nloptwrap) at tight
## tolerances; the JSON stores each optimizer's criterion and the best fit (highest ML logLik / lowest REML criterion)
## with its theta, sigma and fixed effects. The Python test suite reads the JSON only; it never calls R.
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })

script_dir <- local({
  a <- commandArgs(trailingOnly = FALSE)
  f <- sub("^--file=", "", a[grep("^--file=", a)])
  if (length(f) == 1L) dirname(normalizePath(f)) else getwd()
})
args <- commandArgs(trailingOnly = TRUE)
data_dir <- normalizePath(if (length(args) >= 1L) args[[1L]] else
  file.path(script_dir, "..", "..", "..", "shared", "data"), mustWork = TRUE)
out_json <- if (length(args) >= 2L) args[[2L]] else file.path(script_dir, "lme4_optima.json")

## grouping factors and categorical columns: levels sorted in C order (= Python's sorted(set(map(str, x))))
fac <- function(x) factor(x, levels = sort(unique(as.character(x)), method = "radix"))
rd <- function(file, factors) {
  d <- read.csv(file.path(data_dir, file), stringsAsFactors = FALSE)
  for (v in factors) d[[v]] <- fac(d[[v]])
  d
}
sleep <- rd("sleepstudy.csv", "Subject"); sleep$Days2 <- sleep$Days^2
data <- list(
  sleepstudy = sleep,
  penicillin = rd("Penicillin.csv", c("plate", "sample")),
  pastes = rd("Pastes.csv", c("batch", "cask", "sample")),
  dyestuff = rd("Dyestuff.csv", "Batch"),
  grouseticks = rd("grouseticks.csv", c("BROOD", "LOCATION", "YEAR")),
  dillonE1 = rd("dillonE1.csv", c("subj", "item", "int")),
  dutch = rd("dutch.csv", c("subject", "item")),
  english = rd("english.csv", c("subject", "item")),
  eeg = rd("eeg_complete.csv", c("subj", "item")),
  gg05 = rd("gg05_rc.csv", c("subj", "item", "condition", "experiment")),
  mandarin = rd("gibsonwu.csv", c("subj", "item", "type")),
  mandarin2 = rd("gibsonwu2.csv", c("subj", "item", "condition")),
  pupil = rd("pupil_complete.csv", "subj"),
  stroop = rd("stroop.csv", c("subj", "condition")),
  electric = rd("electric.csv", c("pair", "grade", "treatment")),
  fibrosis = rd("fibrosis.csv", c("Patient", "Sex", "SmokingStatus")),
  insteval = rd("InstEval.csv", c("s", "d", "dept", "service", "studage", "lectage"))
)
## key, data, R formula (the Python formulas live in tests/test_ml_optima.py under the same key)
models <- list(
  c("sleepstudy", "sleepstudy", "Reaction ~ Days + (Days | Subject)"),
  c("sleepstudy_uncorr", "sleepstudy", "Reaction ~ Days + (Days || Subject)"),
  c("sleepstudy_quad3", "sleepstudy", "Reaction ~ Days + (Days + Days2 | Subject)"),
  c("penicillin", "penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
  c("pastes", "pastes", "strength ~ 1 + (1 | batch/cask)"),
  c("pastes_cask_singular", "pastes", "strength ~ 1 + (1 | cask)"),
  c("dyestuff", "dyestuff", "Yield ~ 1 + (1 | Batch)"),
  c("grouseticks", "grouseticks", "logTICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)"),
  c("grouseticks_raw", "grouseticks", "TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)"),
  c("grouseticks_nested", "grouseticks", "logTICKS ~ YEAR + HEIGHT + (1 | LOCATION/BROOD)"),
  c("grouseticks_year3", "grouseticks", "logTICKS ~ YEAR + HEIGHT + (YEAR | LOCATION)"),
  c("dillonE1", "dillonE1", "log(rt) ~ int + (int | subj) + (int | item)"),
  c("dutch", "dutch", "NP1 ~ condition + (condition | subject) + (condition | item)"),
  c("english", "english", "NP1 ~ condition + (condition | subject) + (condition | item)"),
  c("eeg", "eeg", "n400 ~ cloze + (cloze | subj) + (cloze | item)"),
  c("gg05", "gg05", "log(RT) ~ condition + (condition | subj) + (condition | item) + (condition | experiment)"),
  c("mandarin", "mandarin", "log(rt) ~ type + (type | subj) + (type | item)"),
  c("mandarin2", "mandarin2", "log(rt) ~ condition + (condition | subj) + (condition | item)"),
  c("pupil", "pupil", "p_size ~ load + (load | subj)"),
  c("stroop", "stroop", "log(RT) ~ condition + (condition | subj)"),
  c("electric", "electric", "y ~ 0 + grade:treatment + (1 | pair)"),
  c("fibrosis_uncorr", "fibrosis", "FVC ~ 1 + Weeks + (1 + Weeks || Patient)"),
  c("fibrosis_full", "fibrosis", "FVC ~ Weeks * Sex + Age + SmokingStatus + (Weeks | Patient)"),
  c("insteval", "insteval", "y ~ service + (1 | s) + (1 | d) + (1 | dept)")
)
optimizers <- list(
  bobyqa = lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5, rhoend = 1e-10)),
  Nelder_Mead = lmerControl(optimizer = "Nelder_Mead", optCtrl = list(maxfun = 1e5, FtolAbs = 1e-12, FtolRel = 1e-15,
                                                                   XtolRel = 1e-10)),
  nloptwrap = lmerControl(optimizer = "nloptwrap", optCtrl = list(maxeval = 1e5, xtol_abs = 1e-10, ftol_abs = 1e-12))
)
ub <- jsonlite::unbox
out <- list()
for (m in models) {
  for (REML in c(FALSE, TRUE)) {
    key <- paste0(m[[1]], if (REML) "_reml" else "_ml")
    crit <- list(); best <- NULL; best_val <- Inf; best_opt <- NA
    for (o in names(optimizers)) {
      fit <- tryCatch(suppressWarnings(suppressMessages(
        lmer(as.formula(m[[3]]), data = data[[m[[2]]]], REML = REML, control = optimizers[[o]]))),
        error = function(e) NULL)
      if (is.null(fit)) next
      ## criterion to minimise: ML deviance or REML criterion
      val <- if (REML) as.numeric(REMLcrit(fit)) else -2 * as.numeric(logLik(fit))
      crit[[o]] <- ub(val)
      if (val < best_val) { best_val <- val; best <- fit; best_opt <- o }
    }
    th <- getME(best, "theta")
    rec <- list(model = ub(m[[1]]), formula = ub(m[[3]]), REML = ub(REML), nobs = ub(nobs(best)),
                criterion = crit, best_optimizer = ub(best_opt), best_criterion = ub(best_val),
                logLik = ub(as.numeric(logLik(best))), sigma = ub(sigma(best)),
                theta = as.numeric(th), theta_names = names(th), fixef = as.list(fixef(best)),
                isSingular = ub(isSingular(best)))
    cat(sprintf("%-28s best %-11s %.8f  (%s)\n", key, best_opt, best_val,
                paste(sprintf("%s=%.6f", names(crit), unlist(crit)), collapse = " ")))
    out[[key]] <- rec
  }
}
out[["_meta"]] <- list(R_version = ub(R.version.string), lme4_version = ub(as.character(packageVersion("lme4"))),
                       created = ub(format(Sys.time(), "%Y-%m-%dT%H:%M:%S%z")))
writeLines(jsonlite::toJSON(out, digits = NA, pretty = TRUE, auto_unbox = FALSE), out_json)
cat("wrote", out_json, "\n")
