#!/usr/bin/env Rscript
## Generate glmer (Laplace, nAGQ = 1) reference ("golden") values for the lmmarg GLMM tests.
##
## Usage:  Rscript tests/golden/make_glmer_golden.R [OUT_JSON]
##   OUT_JSON defaults to glmer.json next to this script.
##
## Data are read from the CSVs bundled in lmmarg/datasets (so R and Python see identical data),
## plus tests/golden/cbpp_expanded.csv, which this script (re)writes from cbpp.csv.
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
out_json <- if (length(args) >= 1L) args[[1L]] else file.path(script_dir, "glmer.json")
data_dir <- normalizePath(file.path(script_dir, "..", "..", "lmmarg", "datasets"), mustWork = TRUE)
cat("data dir :", data_dir, "\n")
cat("output   :", out_json, "\n")

## ----------------------------------------------------------------- data ----
## Every factor (grouping or fixed-effect) gets its unique labels sorted in C (radix)
## order, as Python's sorted(set(map(str, x))); treatment contrasts then use the same
## reference level as formulaic.
fac <- function(x) factor(x, levels = sort(unique(as.character(x)), method = "radix"))
rd <- function(path, factors) {
  d <- read.csv(path, stringsAsFactors = FALSE)
  for (v in factors) d[[v]] <- fac(d[[v]])
  d
}

cbpp <- rd(file.path(data_dir, "cbpp.csv"), c("herd", "period"))
## numeric period, centred: random linear trend per herd for the correlated-slope model
cbpp$pnum <- as.numeric(as.character(cbpp$period)) - 2.5

## One row per animal (0/1 response): must give the same estimates as the binomial fit.
cbpp_expanded <- do.call(rbind, lapply(seq_len(nrow(cbpp)), function(i) {
  r <- cbpp[i, ]
  data.frame(herd = as.character(r$herd), period = as.character(r$period),
             y = c(rep(1L, r$incidence), rep(0L, r$size - r$incidence)),
             stringsAsFactors = FALSE)
}))
expanded_csv <- file.path(script_dir, "cbpp_expanded.csv")
write.csv(cbpp_expanded, expanded_csv, row.names = FALSE)
cbpp_expanded <- rd(expanded_csv, c("herd", "period"))
stopifnot(nrow(cbpp_expanded) == sum(cbpp$size), sum(cbpp_expanded$y) == sum(cbpp$incidence))

grouseticks <- rd(file.path(data_dir, "grouseticks.csv"), c("INDEX", "BROOD", "YEAR", "LOCATION"))
height_mean <- mean(grouseticks$HEIGHT)
height_sd <- sd(grouseticks$HEIGHT)
grouseticks$HEIGHT_c <- (grouseticks$HEIGHT - height_mean) / height_sd

verbagg <- rd(file.path(data_dir, "VerbAgg.csv"),
              c("item", "id", "btype", "situ", "mode", "Gender", "resp", "r2"))
stopifnot(nrow(verbagg) == 7584L, all(verbagg$r2num == as.integer(verbagg$r2 == "Y")))

## ------------------------------------------------------------- control ----
ctrl_for <- function(optimizer, tolPwrss = NULL) {
  ctrl <- if (optimizer == "bobyqa")
    glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5, rhoend = 1e-10))
  else
    glmerControl(optimizer = "Nelder_Mead", optCtrl = list(maxfun = 1e5))
  if (!is.null(tolPwrss)) ctrl$tolPwrss <- tolPwrss
  ctrl
}
## glmer's PIRLS stops when the relative change of the penalized deviance is < tolPwrss (1e-7 by
## default) and does NOT refactor L at the final iterate: the log-determinant in logLik(fit) uses
## the weights of the previous PIRLS iterate. The change in the penalized deviance is quadratic in the
## step, so that iterate is only ~sqrt(tolPwrss) from the mode. This gives an O(1e-6) relative error in
## logLik (up to ~2e-3 absolute here), even though the final modes are accurate. The "exact" values
## below run PIRLS with tolPwrss = TIGHT_PWRSS, take lme4's final modes u, aic() and weights, and
## refactor I + Lambda^T Z^T W Z Lambda at those final weights.
TIGHT_PWRSS <- 1e-13

## exact Laplace log-likelihood as a function of c(theta, beta), built from glmer's own objects
make_exact_loglik <- function(fit) {
  devfun_x <- update(fit, devFunOnly = TRUE, control = ctrl_for("bobyqa", TIGHT_PWRSS))
  e <- environment(devfun_x)
  stopifnot(e$tolPwrss == TIGHT_PWRSS)
  Lt <- getME(fit, "Lambdat"); Lind <- getME(fit, "Lind"); Zt <- getME(fit, "Zt")
  I <- Diagonal(nrow(Lt))
  function(pars) {
    devfun_x(pars)                               # PIRLS to the conditional mode (stale L discarded)
    Lt@x <- as.numeric(pars[Lind])
    A <- Lt %*% Zt %*% Diagonal(x = as.numeric(e$resp$sqrtXwt))   # Lambda^T Z^T W^(1/2), final weights
    ldL2 <- as.numeric(determinant(forceSymmetric(tcrossprod(A) + I), logarithm = TRUE)$modulus)
    u <- e$pp$u(1)
    -(e$resp$aic() + sum(u^2) + ldL2) / 2
  }
}

## -------------------------------------------------------------- helpers ----
ub <- function(x) jsonlite::unbox(x)
named_list <- function(x, nms = names(x)) setNames(lapply(as.numeric(x), ub), nms)
mat <- function(m) { m <- as.matrix(m); attributes(m) <- list(dim = dim(m)); m }

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

## Per-term covariance Sigma_l = Lambda_l Lambda_l^T (no sigma for binomial/poisson),
## Lambda_l lower triangular filled column-wise from that term's slice of theta (lme4's order).
theta_to_cov <- function(theta, cnms) {
  out <- list(); k <- 0L
  for (i in seq_along(cnms)) {
    d <- length(cnms[[i]])
    L <- matrix(0, d, d)
    nt <- d * (d + 1L) / 2L
    L[lower.tri(L, diag = TRUE)] <- theta[k + seq_len(nt)]   # column-major lower triangle
    k <- k + nt
    out[[i]] <- L %*% t(L)
  }
  stopifnot(k == length(theta))
  out
}

term_names <- function(fit) names(VarCorr(fit))   # lme4's term order ("herd", "id", "item", ...)

fit_glmer <- function(formula, data, family, optimizer, tolPwrss = NULL) {
  tm <- system.time(fit <- glmer(as.formula(formula), data = data, family = family,
                                 nAGQ = 1L, control = ctrl_for(optimizer, tolPwrss)))
  list(fit = fit, time = unname(tm[["elapsed"]]))
}

fit_summary <- function(ff, optimizer) {
  fit <- ff$fit
  list(optimizer = ub(optimizer),
       logLik = ub(as.numeric(logLik(fit))),
       beta = named_list(fixef(fit)),
       theta = named_list(getME(fit, "theta")),
       feval = ub(fit@optinfo$feval),
       conv_messages = as.character(unlist(fit@optinfo$conv$lme4$messages)),
       fit_time_s = ub(ff$time))
}

results <- list()
fit_one <- function(key, formula, data, family, data_desc) {
  fam_obj <- family
  fits <- list(bobyqa = fit_glmer(formula, data, family, "bobyqa"),
               Nelder_Mead = fit_glmer(formula, data, family, "Nelder_Mead"))
  lls <- vapply(fits, function(ff) as.numeric(logLik(ff$fit)), 0)
  best <- names(fits)[which.max(lls)]
  fit <- fits[[best]]$fit

  beta <- fixef(fit)
  theta <- getME(fit, "theta")
  cnms <- getME(fit, "cnms")
  tnames <- term_names(fit)
  stopifnot(length(tnames) == length(cnms))
  ll <- as.numeric(logLik(fit))

  ## VarCorr must equal Lambda Lambda^T built from theta
  vc <- VarCorr(fit)
  covs <- theta_to_cov(theta, cnms)
  for (i in seq_along(vc)) {
    v <- vc[[i]]; attributes(v) <- list(dim = dim(v))
    stopifnot(max(abs(v - covs[[i]])) < 1e-10)
  }

  ## Laplace log-likelihood through the stage-2 deviance function: argument c(theta, beta)
  devfun <- update(fit, devFunOnly = TRUE)
  ll_hat <- -devfun(c(theta, beta)) / 2
  stopifnot(abs(ll_hat - ll) < 1e-6)
  ## exact Laplace value (see make_exact_loglik)
  exact_ll <- make_exact_loglik(fit)
  ll_exact <- exact_ll(c(theta, beta))
  point <- function(label, th, be) {
    l <- -devfun(c(th, be)) / 2
    lx <- exact_ll(c(th, be))
    cv <- theta_to_cov(th, cnms)
    list(label = ub(label),
         theta = named_list(th, names(theta)),
         beta = named_list(be, names(beta)),
         cov = setNames(lapply(cv, mat), tnames),
         logLik = ub(l),
         logLik_exact = ub(lx))
  }
  pts <- list(point("theta*0.7", theta * 0.7, beta),
              point("theta*1.3, beta+0.1", theta * 1.3, beta + 0.1))
  stopifnot(abs(-devfun(c(theta, beta)) / 2 - ll) < 1e-6)
  stopifnot(abs(exact_ll(c(theta, beta)) - ll_exact) < 1e-9)   # independent of the PIRLS start

  ## maximize the exact Laplace log-likelihood (minqa::bobyqa from glmer's estimates)
  nth <- length(theta)
  tm <- system.time(opt <- minqa::bobyqa(c(theta, beta), function(p) -2 * exact_ll(p),
                                         lower = c(getME(fit, "lower"), rep(-Inf, length(beta))),
                                         control = list(rhobeg = 1e-3, rhoend = 1e-10, maxfun = 1e5)))
  th_x <- setNames(opt$par[seq_len(nth)], names(theta)); be_x <- setNames(opt$par[-seq_len(nth)], names(beta))
  stopifnot(-opt$fval / 2 >= ll_exact - 1e-9)
  exact_fit <- list(
    optimizer = ub("minqa::bobyqa on the exact Laplace logLik, started at glmer's estimates"),
    logLik = ub(-opt$fval / 2),
    beta = named_list(be_x),
    theta = named_list(th_x),
    cov = setNames(lapply(theta_to_cov(th_x, cnms), mat), tnames),
    feval = ub(opt$feval), ierr = ub(opt$ierr), fit_time_s = ub(unname(tm[["elapsed"]])))

  re <- ranef(fit)
  ranef_out <- list(); terms_out <- list()
  for (i in seq_along(cnms)) {
    grp <- names(cnms)[i]; cols <- cnms[[i]]
    modes <- as.matrix(re[[grp]][, cols, drop = FALSE])
    ranef_out[[tnames[i]]] <- list(
      levels = rownames(modes),
      columns = cols,
      values = lapply(seq_len(nrow(modes)), function(j) unname(modes[j, ])))
    terms_out[[tnames[i]]] <- list(factor = ub(grp), columns = cols,
                                   columns_formulaic = formulaic_names(cols, data),
                                   n_levels = ub(nlevels(data[[grp]])))
    stopifnot(identical(rownames(modes), levels(data[[grp]])))
  }

  rec <- list(
    formula = ub(formula),
    data = ub(data_desc),
    family = ub(fam_obj$family),
    link = ub(fam_obj$link),
    n = ub(nobs(fit)),
    beta = named_list(beta),
    beta_formulaic = named_list(beta, formulaic_names(names(beta), data)),
    theta = named_list(theta),
    terms = terms_out,
    cov = setNames(lapply(covs, mat), tnames),
    logLik = ub(ll),
    logLik_exact = ub(ll_exact),
    deviance = ub(as.numeric(deviance(fit))),
    minus2logLik = ub(-2 * ll),
    devfun_logLik_at_hat = ub(ll_hat),
    ranef = ranef_out,
    points = pts,
    isSingular = ub(isSingular(fit)),
    reference_optimizer = ub(best),
    fits = lapply(names(fits), function(o) fit_summary(fits[[o]], o)),
    exact_fit = exact_fit
  )
  names(rec$fits) <- names(fits)

  cat(sprintf("\n== %-26s %s  [%s/%s]\n", key, formula, fam_obj$family, fam_obj$link))
  cat(sprintf("   logLik bobyqa = %.8f  Nelder_Mead = %.8f  -> %s;  deviance = %.6f\n",
              lls[["bobyqa"]], lls[["Nelder_Mead"]], best, deviance(fit)))
  cat("   beta :", paste(sprintf("%s=%.6f", names(beta), beta), collapse = "  "), "\n")
  cat("   theta:", paste(sprintf("%.6g", theta), collapse = " "), "\n")
  cat(sprintf("   -devfun(hat)/2 - logLik = %.3g\n", ll_hat - ll))
  cat(sprintf("   logLik_exact = %.8f (logLik - exact = %.3g);  exact fit logLik = %.8f\n",
              ll_exact, ll - ll_exact, exact_fit$logLik))
  cat(sprintf("   points: %s\n", paste(sprintf("%.6f / exact %.6f", vapply(pts, function(p) p$logLik, 0),
                                           vapply(pts, function(p) p$logLik_exact, 0)), collapse = "  ")))
  results[[key]] <<- rec
  invisible(fit)
}

## --------------------------------------------------------------- models ----
f_cbpp <- fit_one("cbpp_binomial", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
                  cbpp, binomial(), "cbpp.csv")
fit_one("cbpp_probit", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
        cbpp, binomial(link = "probit"), "cbpp.csv")
fit_one("cbpp_slope", "cbind(incidence, size - incidence) ~ period + (1 + pnum | herd)",
        cbpp, binomial(), "cbpp.csv; pnum = as.numeric(period) - 2.5")
f_exp <- fit_one("cbpp_expanded", "y ~ period + (1 | herd)",
                 cbpp_expanded, binomial(), "tests/golden/cbpp_expanded.csv (one 0/1 row per animal)")
fit_one("grouseticks_poisson", "TICKS ~ YEAR + HEIGHT_c + (1 | BROOD) + (1 | LOCATION)",
        grouseticks, poisson(), "grouseticks.csv; HEIGHT_c = (HEIGHT - height_mean) / height_sd")
fit_one("grouseticks_poisson_olre",
        "TICKS ~ YEAR + HEIGHT_c + (1 | BROOD) + (1 | LOCATION) + (1 | INDEX)",
        grouseticks, poisson(), "grouseticks.csv; HEIGHT_c = (HEIGHT - height_mean) / height_sd")
f_vb <- fit_one("verbagg_bernoulli", "r2num ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)",
                verbagg, binomial(), "VerbAgg.csv")
fit_one("verbagg_slope", "r2num ~ Anger + Gender + btype + situ + (1 | id) + (1 + Gender | item)",
        verbagg, binomial(), "VerbAgg.csv")

for (k in c("grouseticks_poisson", "grouseticks_poisson_olre"))
  results[[k]]$derived <- list(HEIGHT_c = ub("(HEIGHT - height_mean) / height_sd"),
                               height_mean = ub(height_mean), height_sd = ub(height_sd))
results$cbpp_slope$derived <- list(pnum = ub("as.numeric(as.character(period)) - 2.5"))

## ------------------------------------------- binomial-coefficient check ----
## (1) the binomial fit and the expanded 0/1 fit have the same estimates, and their
##     logLiks differ by exactly sum(lchoose(size, incidence));
## (2) the conditional part of the binomial Laplace logLik is sum(dbinom(k, n, mu, log = TRUE)),
##     i.e. the family's aic() (which glmer uses) contains log C(n, k).
lchoose_sum <- sum(lchoose(cbpp$size, cbpp$incidence))
ll_bin <- results$cbpp_binomial$logLik
ll_exp <- results$cbpp_expanded$logLik
diff_bin_exp <- ll_bin - ll_exp
mu <- fitted(f_cbpp)
cond_dbinom <- sum(dbinom(cbpp$incidence, cbpp$size, mu, log = TRUE))
cond_aic <- -f_cbpp@resp$aic() / 2
## Laplace pieces: logLik = cond - 0.5 ||u||^2 - 0.5 log|L|^2
u <- getME(f_cbpp, "u")
ldL2 <- 2 * as.numeric(determinant(getME(f_cbpp, "L"), logarithm = TRUE)$modulus)
ll_pieces <- cond_dbinom - 0.5 * sum(u^2) - 0.5 * ldL2
cat(sprintf("\nbinomial vs expanded: logLik diff = %.10f, sum lchoose = %.10f\n", diff_bin_exp, lchoose_sum))
cat(sprintf("sum dbinom(log) = %.10f, -resp$aic()/2 = %.10f, pieces = %.10f, logLik = %.10f\n",
            cond_dbinom, cond_aic, ll_pieces, ll_bin))
includes <- abs(diff_bin_exp - lchoose_sum) < 1e-5 && abs(ll_pieces - ll_bin) < 1e-6
stopifnot(includes)
stopifnot(max(abs(unlist(results$cbpp_binomial$beta) - unlist(results$cbpp_expanded$beta))) < 1e-4)
binom_check <- list(
  loglik_includes_binomial_coefficients = ub(includes),
  sum_lchoose_cbpp = ub(lchoose_sum),
  logLik_binomial_minus_expanded = ub(diff_bin_exp),
  cond_sum_dbinom_at_mu_hat = ub(cond_dbinom),
  cond_minus_half_resp_aic = ub(cond_aic),
  laplace_pieces_logLik = ub(ll_pieces),
  note = ub(paste("glmer's Laplace deviance is resp$aic() + ||u||^2 + log|L|^2; the binomial family's aic()",
                  "is -2*sum(dbinom(k, n, mu, log=TRUE)) and includes log C(n, k); poisson's includes -log(y!).",
                  "deviance(fit) for a GLMM is NOT -2*logLik: it is sum(residuals(fit, 'deviance')^2), the",
                  "conditional deviance at the modes, without ||u||^2, log|L|^2 or the saturated log-likelihood;",
                  "-2*logLik(fit) is getME(fit, 'devcomp')$cmp[['dev']]."))
)

## --------------------------------------------------------------- timing ----
vb_times <- vapply(1:3, function(i)
  system.time(glmer(r2num ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), data = verbagg,
                    family = binomial(), control = ctrl_for("bobyqa")))[["elapsed"]], 0)
cat(sprintf("\nverbagg_bernoulli bobyqa fit times: %s (median %.2f s)\n",
            paste(sprintf("%.2f", vb_times), collapse = " "), median(vb_times)))

out <- c(list(
  `_meta` = list(
    R_version = ub(R.version.string),
    lme4_version = ub(as.character(packageVersion("lme4"))),
    Matrix_version = ub(as.character(packageVersion("Matrix"))),
    minqa_version = ub(as.character(packageVersion("minqa"))),
    jsonlite_version = ub(as.character(packageVersion("jsonlite"))),
    platform = ub(R.version$platform),
    created = ub(format(Sys.time(), "%Y-%m-%dT%H:%M:%S%z")),
    nAGQ = ub(1L),
    control = ub(paste("glmerControl(optimizer='bobyqa', optCtrl=list(maxfun=1e5, rhoend=1e-10)) and",
                       "glmerControl(optimizer='Nelder_Mead', optCtrl=list(maxfun=1e5)); the better logLik is the reference")),
    loglik_includes_binomial_coefficients = ub(includes),
    factor_levels = ub("every factor: factor(x, levels = sort(unique(as.character(x)), method='radix'))"),
    devfun = ub("devfun <- update(fit, devFunOnly = TRUE); argument c(theta, beta); logLik = -devfun(pars)/2"),
    tolPwrss_exact = ub(TIGHT_PWRSS),
    logLik_exact = ub(paste("logLik_exact: the Laplace logLik at the converged modes. PIRLS runs with tolPwrss = tolPwrss_exact",
                            "and log|I + Lambda^T Z^T W Z Lambda| is refactored at the final weights. glmer's logLik",
                            "(default tolPwrss 1e-7) takes the log-determinant at the previous PIRLS iterate:",
                            "O(1e-6) relative error")),
    cov_from_theta = ub("Sigma_l = Lambda_l Lambda_l^T, Lambda_l lower triangular filled column-wise from theta (no sigma)")
  ),
  `_binomial_coefficients` = binom_check,
  `_timing` = list(model = ub("verbagg_bernoulli"), optimizer = ub("bobyqa"),
                   elapsed_s = vb_times, median_elapsed_s = ub(median(vb_times)),
                   cores = ub(parallel::detectCores()))
), results)
writeLines(jsonlite::toJSON(out, digits = NA, pretty = TRUE, auto_unbox = FALSE), out_json)
cat("\nwrote", out_json, "with", length(results), "fits\n")
