#!/usr/bin/env Rscript
## glmmTMB (Laplace) reference values for lmmarg's families with a dispersion parameter
## (tests/test_families.py): negbinomial (nbinom2), gamma (Gamma(link = "log")) and beta (beta_family()).
##
## Usage:  Rscript tests/golden/make_glmmtmb_golden.R
##   writes families.csv (the simulated data, 300 rows) and glmmtmb.json next to this script.
## The Python tests only read these two files; they never call R.
##
## JSON layout: {"<family>": {"formula", "response", "loglik", "fixef": {name: value}, "sd_g",
##   "dispersion" (lmmarg's parameter: nbinom2 shape = sigma(fit); Gamma shape = 1 / sigma(fit)^2;
##   beta phi = sigma(fit)), "sigma" (glmmTMB's sigma(fit)), "converged"}, "versions": {...}}.
## glmmTMB's Laplace approximation uses the exact (observed) Hessian of the joint density in the random effects,
## as lmmarg does for these families.

suppressPackageStartupMessages({
  library(glmmTMB)
  library(jsonlite)
})

script_dir <- local({
  a <- commandArgs(trailingOnly = FALSE)
  f <- sub("^--file=", "", a[grep("^--file=", a)])
  if (length(f) == 1L) dirname(normalizePath(f)) else getwd()
})

## ----------------------------------------------------------------- data ----
set.seed(20261207)
G <- 30L; n <- 10L
g <- rep(sprintf("g%02d", seq_len(G)), each = n)
x <- round(rnorm(G * n), 4)
u <- rnorm(G, 0, 0.5)[rep(seq_len(G), each = n)]
mu_nb <- exp(0.5 + 0.3 * x + u)
y_nb <- rnbinom(G * n, size = 2, mu = mu_nb)
mu_ga <- exp(1.0 - 0.4 * x + u)
y_gamma <- signif(rgamma(G * n, shape = 3, rate = 3 / mu_ga), 8)
mu_be <- plogis(-0.3 + 0.5 * x + u)
y_beta <- signif(rbeta(G * n, mu_be * 15, (1 - mu_be) * 15), 8)
y_beta <- pmin(pmax(y_beta, 1e-6), 1 - 1e-6)
d <- data.frame(g = g, x = x, y_nb = y_nb, y_gamma = y_gamma, y_beta = y_beta)
write.csv(d, file.path(script_dir, "families.csv"), row.names = FALSE)
d <- read.csv(file.path(script_dir, "families.csv"))   # exactly what Python reads
d$g <- factor(d$g)

## ----------------------------------------------------------------- fits ----
fit_one <- function(response, family, to_disp) {
  f <- as.formula(paste(response, "~ x + (1 | g)"))
  m <- glmmTMB(f, data = d, family = family)
  s <- sigma(m)
  list(formula = paste(response, "~ x + (1 | g)"), response = response,
       loglik = as.numeric(logLik(m)), fixef = as.list(fixef(m)$cond),
       sd_g = sqrt(as.numeric(VarCorr(m)$cond$g[1, 1])),
       dispersion = to_disp(s), sigma = s,
       converged = isTRUE(m$sdr$pdHess) && m$fit$convergence == 0)
}

out <- list(
  negbinomial = fit_one("y_nb", nbinom2(), function(s) s),
  gamma = fit_one("y_gamma", Gamma(link = "log"), function(s) 1 / s^2),
  beta = fit_one("y_beta", beta_family(), function(s) s),
  versions = list(R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
                  TMB = as.character(packageVersion("TMB")))
)
for (k in c("negbinomial", "gamma", "beta")) {
  r <- out[[k]]
  cat(sprintf("%-12s logLik %.8f  sd %.6f  dispersion %.6f  converged %s\n", k, r$loglik, r$sd_g,
              r$dispersion, r$converged))
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), file.path(script_dir, "glmmtmb.json"))
