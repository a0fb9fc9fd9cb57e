"""Analytic marginalization of Gaussian random effects (Lai, Domke & Sheldon, 2024).

``build_plan`` analyses the design once; the kernels ``log_marginal``,
``conditional_mean`` and ``conditional_sample`` are pure, jit-able and
differentiable functions of (plan, parameters).
"""
from .kernels import Factor, conditional_mean, conditional_sample, factorize, log_marginal
from .plan import CellSums, ClassSpec, MarginalTooLarge, Plan, auto_marginalize, build_plan, plan_from_statistics

__all__ = [
    "ClassSpec",
    "Plan",
    "MarginalTooLarge",
    "build_plan",
    "CellSums",
    "plan_from_statistics",
    "auto_marginalize",
    "Factor",
    "factorize",
    "log_marginal",
    "conditional_mean",
    "conditional_sample",
]
