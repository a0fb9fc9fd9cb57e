"""The walk a newcomer follows: which lmmarg functions ``Model.log_marginal`` runs, traced eagerly (no jit).

    python -m benchmarks.walk [penicillin|crossed]

penicillin: ``diameter ~ 1 + (1|plate) + (1|sample)``; crossed: ``y ~ x + (x|a) + (1|b)`` on 400 simulated rows.
Prints the value, the number of distinct functions, modules and source lines, then the functions in call order.
"""
from __future__ import annotations

import collections
import inspect
import sys

import jax
import numpy as np
import pandas as pd

import lmmarg


def model(which: str) -> lmmarg.Model:
    if which == "penicillin":
        return lmmarg.Model("diameter ~ 1 + (1|plate) + (1|sample)", lmmarg.datasets.load("Penicillin"))
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"a": rng.integers(0, 30, n), "b": rng.integers(0, 20, n), "x": rng.normal(size=n),
                       "y": rng.normal(size=n)})
    return lmmarg.Model("y ~ x + (x|a) + (1|b)", df)


def walk(which: str = "penicillin") -> tuple[float, list]:
    """(log_marginal's value, [(module path, function name, code)] in first-call order)."""
    m = model(which)
    cov = {t.name: np.eye(t.d) * 0.5 for t in m.terms}
    beta = np.zeros(len(m.fixed_names))
    m.log_marginal(beta, 1.0, cov)            # the plan and caches exist before the traced call
    seen = collections.OrderedDict()

    def profile(frame, event, arg):
        co = frame.f_code
        if event == "call" and "/lmmarg/" in co.co_filename and "site-packages" not in co.co_filename:
            seen.setdefault((co.co_filename.split("/lmmarg/")[-1], co.co_name), co)

    with jax.disable_jit():
        sys.setprofile(profile)
        try:
            value = m.log_marginal(beta, 1.0, cov)
        finally:
            sys.setprofile(None)
    return float(value), [(k[0], k[1], co) for k, co in seen.items()]


def main(argv=None) -> None:
    which = (argv or sys.argv[1:] or ["penicillin"])[0]
    value, calls = walk(which)
    lines = sum(len(inspect.getsourcelines(co)[0]) for *_, co in calls)
    print(f"{which}: log_marginal {value:.6f}; {len(calls)} functions in {len({c[0] for c in calls})} modules, "
          f"{lines} source lines")
    for path, name, _ in calls:
        print(f"  {path:28s} {name}")


if __name__ == "__main__":
    main()
