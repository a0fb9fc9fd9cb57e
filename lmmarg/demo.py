"""The README's main job: Reaction ~ Days + (Days | Subject) on the bundled sleepstudy data."""
from __future__ import annotations

import argparse

from . import datasets
from .model import Model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lmmarg", description=__doc__)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = Model("Reaction ~ Days + (Days | Subject)", datasets.load("sleepstudy"))
    print(model)
    print()
    fit = model.sample(draws=args.draws, warmup=args.warmup, chains=args.chains, seed=args.seed)
    print(fit.summary().to_string())
