#!/usr/bin/env Rscript
## Generate lme4 reference ("golden") values for the lmmarg test suite.
##
## Usage:  Rscript tests/golden/make_lme4_golden.R [DATA_DIR] [OUT_JSON]
##   DATA_DIR defaults to ../../../shared/data relative to this script
##   OUT_JSON defaults to lme4.json next to this script.
##
## The Python test suite only reads the JSON written here; it never calls R.
## See README.md in this directory for the layout of the JSON.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

## ---------------------------------------------------------------- paths ----
script_dir <- local({
  a <- commandArgs(trailingOnly = FALSE)
  f <- sub("^--file=", "", a[grep("^--file=", a)])
  if (length(f) == 1L) dirname(normalizePath(f)) else getwd()
})
args <- commandArgs(trailingOnly = TRUE)
data_dir <- if (length(args) >= 1L) args[[1L]] else
  file.path(script_dir, "..", "..", "..", "shared", "data")
out_json <- if (length(args) >= 2L) args[[2L]] else file.path(script_dir, "lme4.json")
data_dir <- normalizePath(data_dir, mustWork = TRUE)
cat("data dir :", data_dir, "\n")
cat("output   :", out_json, "\n")

## ----------------------------------------------------------------- data ----
## All grouping factors are categorical whatever their dtype; levels are the
## unique labels sorted in C (radix) order, so they match Python's sorted().
fac <- function(x) factor(x, levels = sort(unique(as.character(x)), method = "radix"))
rd <- function(file, factors) {
  d <- read.csv(file.path(data_dir, file), stringsAsFactors = FALSE)
  for (v in factors) d[[v]] <- fac(d[[v]])
  d
}

sleepstudy  <- rd("sleepstudy.csv",  "Subject")
penicillin  <- rd("Penicillin.csv",  c("plate", "sample"))
pastes      <- rd("Pastes.csv",      c("batch", "cask", "sample"))
dyestuff    <- rd("Dyestuff.csv",    "Batch")
grouseticks <- rd("grouseticks.csv", c("BROOD", "LOCATION", "YEAR"))
insteval    <- rd("InstEval.csv",    c("s", "d", "studage", "lectage", "service", "dept"))

## ------------------------------------------------------------- control ----
## bobyqa with a tight trust-region end radius (default rhoend is 2e-7 * rhobeg).
ctrl <- lmerControl(optimizer = "bobyqa",
                    optCtrl = list(maxfun = 1e5, rhoend = 1e-10))

## -------------------------------------------------------------- helpers ----
ub <- function(x) jsonlite::unbox(x)
## named numeric vector -> JSON object {name: scalar}
named_list <- function(x, nms = names(x)) setNames(lapply(as.numeric(x), ub), nms)

## R coefficient / column names -> formulaic names.
##   "(Intercept)" -> "Intercept";  factor column "YEAR96" -> "YEAR[T.96]";
##   interactions are mapped part by part (a:b).
formulaic_names <- function(nms, data) {
  map_one <- function(p) {
    if (p == "(Intercept)") return("Intercept")
    for (v in names(data)) {
      if (is.factor(data[[v]]) && startsWith(p, v)) {
        lev <- substring(p, nchar(v) + 1L)
        if (lev %in% levels(data[[v]])) return(sprintf("%s[T.%s]", v, lev))
      }
    }
    p
  }
  vapply(nms, function(n) paste(vapply(strsplit(n, ":", fixed = TRUE)[[1]], map_one, ""),
                                collapse = ":"), "", USE.NAMES = FALSE)
}

random_terms <- function(fit, data) {
  vc  <- VarCorr(fit)             # one entry per random-effect term, lme4 order
  re  <- ranef(fit)               # one data.frame per grouping factor
  cnms <- getME(fit, "cnms")      # names = grouping factor, per term (same order as vc)
  stopifnot(length(vc) == length(cnms))
  out <- vector("list", length(vc))
  names(out) <- names(vc)
  for (i in seq_along(vc)) {
    v   <- vc[[i]]
    grp <- names(cnms)[i]
    cols <- cnms[[i]]
    sds <- attr(v, "stddev")
    cor <- attr(v, "correlation")
    cov <- unclass(v); attributes(cov) <- list(dim = dim(v))
    modes <- as.matrix(re[[grp]][, cols, drop = FALSE])
    out[[i]] <- list(
      group = ub(names(vc)[i]),            # as lme4 prints, e.g. "cask:batch", "Subject.1"
      factor = ub(grp),                    # grouping factor in ranef()/ngrps()
      columns = cols,
      columns_formulaic = formulaic_names(cols, data),
      sd = as.numeric(sds),
      corr = unname(cor),                  # row-major array of rows, column order = columns
      cov = unname(cov),
      ranef = setNames(lapply(seq_len(nrow(modes)), function(j) unname(modes[j, ])),
                       rownames(modes))
    )
  }
  out
}

results <- list()
fit_one <- function(key, formula, data, REML, time = FALSE) {
  f <- as.formula(formula)
  tm <- system.time(fit <- lmer(f, data = data, REML = REML, control = ctrl))
  beta <- fixef(fit)
  se <- sqrt(diag(as.matrix(vcov(fit))))
  names(se) <- names(beta)
  th <- getME(fit, "theta")
  ll <- as.numeric(logLik(fit))
  rec <- list(
    model = ub(sub("_(ml|reml)$", "", key)),
    formula = ub(formula),
    REML = ub(REML),
    logLik = ub(ll),                                      # logLik(fit) as lme4 gives it
    logLik_ML = ub(as.numeric(logLik(fit, REML = FALSE))),# ML log-lik (at REML theta for REML fits)
    deviance_ML = ub(as.numeric(deviance(fit, REML = FALSE))),
    fixef = named_list(beta),
    fixef_formulaic = named_list(beta, formulaic_names(names(beta), data)),
    se = named_list(se),
    se_formulaic = named_list(se, formulaic_names(names(se), data)),
    sigma = ub(sigma(fit)),
    theta = as.numeric(th),
    theta_names = names(th),
    random = random_terms(fit, data),
    nobs = ub(nobs(fit)),
    ngrps = named_list(ngrps(fit)),
    isSingular = ub(isSingular(fit)),
    optimizer = ub(fit@optinfo$optimizer),
    feval = ub(fit@optinfo$feval),
    conv_messages = as.character(unlist(fit@optinfo$conv$lme4$messages))
  )
  if (REML) {
    rec$REMLcrit <- ub(as.numeric(REMLcrit(fit)))
    rec$logLik_REML <- ub(ll)
  }
  if (time) rec$fit_time_s <- ub(unname(tm[["elapsed"]]))
  ## ---- print check
  cat(sprintf("\n== %-22s %s  REML=%s\n", key, formula, REML))
  cat(sprintf("   logLik = %.6f  %s sigma = %.6f  singular = %s  time = %.2fs\n",
              ll, if (REML) sprintf("REMLcrit = %.6f ", REMLcrit(fit)) else "",
              sigma(fit), isSingular(fit), tm[["elapsed"]]))
  cat("   fixef:", paste(sprintf("%s=%.6f", names(beta), beta), collapse = "  "), "\n")
  cat("   theta:", paste(sprintf("%.6g", th), collapse = " "), "\n")
  for (t in rec$random)
    cat(sprintf("   %-12s sd: %s\n", t$group, paste(sprintf("%.6f", t$sd), collapse = " ")))
  if (length(rec$conv_messages)) cat("   CONVERGENCE MESSAGES:", rec$conv_messages, "\n")
  results[[key]] <<- rec
  invisible(fit)
}

both <- function(name, formula, data) {
  fit_one(paste0(name, "_ml"), formula, data, REML = FALSE)
  fit_one(paste0(name, "_reml"), formula, data, REML = TRUE)
}

## --------------------------------------------------------------- models ----
both("sleepstudy",        "Reaction ~ Days + (Days | Subject)",              sleepstudy)
both("sleepstudy_uncorr", "Reaction ~ Days + (Days || Subject)",             sleepstudy)
both("penicillin",        "diameter ~ 1 + (1 | plate) + (1 | sample)",      penicillin)
both("pastes",            "strength ~ 1 + (1 | batch/cask)",                 pastes)
both("dyestuff",          "Yield ~ 1 + (1 | Batch)",                         dyestuff)
both("grouseticks",       "logTICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION)", grouseticks)
## Singular example: in Pastes the cask labels a/b/c are only meaningful within
## batch, so a cask-only random intercept has (estimated) zero variance.
both("pastes_cask_singular", "strength ~ 1 + (1 | cask)",                   pastes)
fit_one("insteval_ml",
        "y ~ service + lectage + studage + (1 | s) + (1 | d) + (1 | dept:service)",
        insteval, REML = FALSE, time = TRUE)

## --------------------------------------------------------------- checks ----
stopifnot(abs(results$sleepstudy_ml$logLik - (-875.9697)) < 1e-4)
stopifnot(abs(results$sleepstudy_reml$REMLcrit - 1743.6282722) < 1e-5)
stopifnot(isTRUE(as.logical(results$pastes_cask_singular_ml$isSingular)))
stopifnot(isTRUE(as.logical(results$pastes_cask_singular_reml$isSingular)))

## Top level: one object per model+method key, plus "_meta".
out <- c(list(
  `_meta` = list(
    R_version = ub(R.version.string),
    lme4_version = ub(as.character(packageVersion("lme4"))),
    Matrix_version = ub(as.character(packageVersion("Matrix"))),
    minqa_version = ub(as.character(packageVersion("minqa"))),
    jsonlite_version = ub(as.character(packageVersion("jsonlite"))),
    platform = ub(R.version$platform),
    created = ub(format(Sys.time(), "%Y-%m-%dT%H:%M:%S%z")),
    control = ub("lmerControl(optimizer='bobyqa', optCtrl=list(maxfun=1e5, rhoend=1e-10))"),
    factor_levels = ub("grouping factors: factor(x, levels = sort(unique(as.character(x)), method='radix'))")
  )), results)
## digits = NA: jsonlite's maximum precision (15 significant digits).
writeLines(jsonlite::toJSON(out, digits = NA, pretty = TRUE, auto_unbox = FALSE), out_json)
cat("\nwrote", out_json, "with", length(results), "fits\n")
