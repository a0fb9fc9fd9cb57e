"""The classes to integrate out and how they split into a chain and a dense block (NumPy, plan time).

ClassSpec (one random-effect class), merge_same_grouping (terms on one grouping factor form one class),
partition (a chain of nested classes, finest first, and the rest dense), auto_marginalize (the largest set whose
dense block fits), the memory limit of the dense block (default_dense_limit, dense_seconds, LARGE_DENSE) and
MarginalTooLarge with a message that says what to leave to HMC.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..codes import nested as nested_codes

__all__ = ["ClassSpec", "MarginalTooLarge", "auto_marginalize", "default_dense_limit", "dense_seconds",
           "LARGE_DENSE", "merge_same_grouping", "partition", "dense_size", "too_large_message", "dim"]

# The default limit on the dense Schur block is set by memory, not by time (slow is allowed when it is said):
# a value-and-gradient holds about DENSE_WORK_COPIES (n, n) arrays (F, its Cholesky factor, F^-1, cotangents), and
# they may take DENSE_MEMORY_FRACTION of the machine's memory.
DENSE_WORK_COPIES = 6
DENSE_MEMORY_FRACTION = 0.25
LARGE_DENSE = 2000           # blocks above this size get a warning with the measured cost of one evaluation


@dataclass(frozen=True, eq=False)
class ClassSpec:
    """One random-effect class (term).

    name: label; Z: (N, d) per-observation columns; codes: (N,) ints in
    [0, n_groups); n_groups: number of groups (unobserved groups allowed).
    """

    name: str
    Z: np.ndarray
    codes: np.ndarray
    n_groups: int


class MarginalTooLarge(ValueError):
    """The dense Schur block of the requested marginalization exceeds ``dense_limit``."""


def _total_memory() -> float:
    """Physical memory in bytes (8 GiB if unknown)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8.0 * 2**30


def default_dense_limit(itemsize: int = 8) -> int:
    """The largest dense block whose work arrays fit in DENSE_MEMORY_FRACTION of the memory (about 11,000 in
    float64 on a 24 GiB machine)."""
    return int((DENSE_MEMORY_FRACTION * _total_memory() / (DENSE_WORK_COPIES * itemsize)) ** 0.5)


def dense_seconds(n: int) -> float:
    """Measured seconds of one Cholesky factorization and inverse of an (n, n) matrix on this machine (what one
    value-and-gradient needs for the dense block), from an 800 x 800 one scaled by n^3 (checked against the measured
    cost of an ML evaluation at n = 5000, benchmarks/results/large_crossed.md; docs/benchmarks.md, 'Measurements
    behind the code')."""
    m = 800
    A = np.random.default_rng(0).standard_normal((m, m))
    A = A @ A.T + m * np.eye(m)
    t0 = time.perf_counter()
    L = np.linalg.cholesky(A)
    np.linalg.inv(L)
    return (time.perf_counter() - t0) * (n / m) ** 3


def _class_Z(c: ClassSpec, N: int) -> np.ndarray:
    Z = np.asarray(c.Z, dtype=np.float64)
    if Z.ndim == 1:
        Z = Z[:, None]
    if Z.ndim != 2 or Z.shape[0] != N:
        raise ValueError(f"class {c.name!r}: Z must be (N={N}, d), got {Z.shape}")
    return Z


def _class_codes(c: ClassSpec, N: int) -> np.ndarray:
    codes = np.asarray(c.codes).reshape(-1)
    if codes.shape[0] != N:
        raise ValueError(f"class {c.name!r}: codes must have length N={N}")
    if not np.issubdtype(codes.dtype, np.integer):
        if not np.all(np.equal(np.mod(codes, 1), 0)):
            raise ValueError(f"class {c.name!r}: codes must be integers")
    codes = codes.astype(np.int64)
    if N and (codes.min() < 0 or codes.max() >= int(c.n_groups)):
        raise ValueError(f"class {c.name!r}: codes must lie in [0, {c.n_groups})")
    return codes


def dim(c: ClassSpec) -> int:
    Z = np.asarray(c.Z)
    return 1 if Z.ndim == 1 else int(Z.shape[1])


def merge_same_grouping(classes, marg, N: int):
    """Merge the marginalized classes with identical group codes into one class each.

    Returns (merged ClassSpecs with Z (N, sum of d) and validated codes, members: per merged class the original
    class indices, in ``marg`` order). Checked here: every class's Z and codes (errors name the class)."""
    merged, members = [], []
    for i in marg:
        c = classes[i]
        Z, codes = _class_Z(c, N), _class_codes(c, N)
        for k, m in enumerate(merged):
            if m.n_groups == int(c.n_groups) and np.array_equal(m.codes, codes):
                merged[k] = ClassSpec(f"{m.name}+{c.name}", np.concatenate([m.Z, Z], axis=1), m.codes, m.n_groups)
                members[k].append(i)
                break
        else:
            merged.append(ClassSpec(c.name, Z, codes, int(c.n_groups)))
            members.append([i])
    return merged, members


def partition(classes: Sequence[ClassSpec], subset: Sequence[int], nested=None):
    """Split ``subset`` (class indices) into (chain finest-first, dense in given order)."""
    subset = list(subset)
    if not subset:
        return [], []

    def is_nested(a, b):
        if nested is not None:
            return nested[a][b]
        ca, cb = np.asarray(classes[a].codes).reshape(-1), np.asarray(classes[b].codes).reshape(-1)
        return nested_codes(ca, cb)

    def key(i):
        c = classes[i]
        return (-int(c.n_groups), -int(c.n_groups) * dim(c), subset.index(i))

    order = sorted(subset, key=key)
    chain = [order[0]]
    for c in order[1:]:
        if all(is_nested(a, c) for a in chain):
            chain.append(c)
    dense = [i for i in subset if i not in chain]
    return chain, dense


def dense_size(classes, dense) -> int:
    return int(sum(int(classes[i].n_groups) * dim(classes[i]) for i in dense))


def nested_matrix(classes):
    n = len(classes)
    codes = [np.asarray(c.codes).reshape(-1).astype(np.int64) for c in classes]
    return [[(a == b) or nested_codes(codes[a], codes[b]) for b in range(n)]
            for a in range(n)]


def auto_marginalize(classes: Sequence[ClassSpec], dense_limit: int = 4000) -> list:
    """Largest set of class indices whose dense Schur block has size <= ``dense_limit``.

    Ties (same number of classes) are broken by the larger number of marginalized
    random-effect coefficients, then by the smaller dense block.  Exhaustive for
    up to 12 classes, greedy removal beyond.  Returns sorted indices.
    """
    n = len(classes)
    if n == 0:
        return []
    nested = nested_matrix(classes)

    def score(sub):
        chain, dense = partition(classes, sub, nested)
        ds = dense_size(classes, dense)
        total = sum(int(classes[i].n_groups) * dim(classes[i]) for i in sub)
        return ds, total

    if n <= 12:
        for size in range(n, 0, -1):
            best, best_key = None, None
            for sub in itertools.combinations(range(n), size):
                ds, total = score(sub)
                if ds <= dense_limit and (best_key is None or (-total, ds) < best_key):
                    best, best_key = list(sub), (-total, ds)
            if best is not None:
                return best
        return []
    sub = list(range(n))
    while sub:
        ds, _ = score(sub)
        if ds <= dense_limit:
            return sub
        _, dense = partition(classes, sub, nested)
        worst = max(dense, key=lambda i: int(classes[i].n_groups) * dim(classes[i]))
        sub.remove(worst)
    return []


def too_large_message(classes, marg, chain, dense, ds, dense_limit, p_beta=0):
    def desc(i):
        c = classes[i]
        return f"{c.name!r} ({c.n_groups} groups x d={dim(c)} = {c.n_groups * dim(c)})"

    sub = [classes[i] for i in marg]
    keep = [marg[i] for i in auto_marginalize(sub, dense_limit - p_beta)]
    leave = [i for i in marg if i not in keep]
    msg = (
        f"Marginalizing these classes needs a dense Schur block of size {ds} > "
        f"dense_limit={dense_limit}. Block-diagonal chain: "
        + (", ".join(desc(i) for i in chain) or "none")
        + ". Dense block: " + ", ".join(desc(i) for i in dense)
        + (f", beta ({p_beta} coefficients)" if p_beta else "") + ". "
    )
    if leave:
        msg += (
            "Suggestion: leave " + ", ".join(repr(classes[i].name) for i in leave)
            + f" to HMC (marginalize={[classes[i].name for i in sorted(keep)]}; for a term with many "
            "observations per level also parameterization={" + ", ".join(f"{classes[i].name!r}: 'conditional'"
                                                                       for i in leave)
            + "}, which samples its effects as offsets from their conditional mean given the other parameters), "
            "or raise the limit with Model(..., dense_limit=...) if memory allows (each evaluation then "
            "factorizes the dense block)."
        )
    else:
        msg += "Pass Model(..., dense_limit=...) or marginalize fewer classes."
    return msg
