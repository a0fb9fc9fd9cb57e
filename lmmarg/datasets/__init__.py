"""Small datasets bundled with lmmarg (CSV files copied from lme4 1.1-31 and the NeurIPS 2024 paper's repo).

>>> from lmmarg import datasets
>>> datasets.load("sleepstudy").shape
(180, 3)
"""
from __future__ import annotations

from importlib import resources

import pandas as pd

__all__ = ["load", "available"]

# grouping factors are categorical whatever their dtype in the CSV
_CATEGORICAL = {
    "sleepstudy": ["Subject"],
    "Penicillin": ["plate", "sample"],
    "Pastes": ["batch", "cask", "sample"],
    "Dyestuff": ["Batch"],
    "grouseticks": ["INDEX", "BROOD", "YEAR", "LOCATION"],
}


def available() -> list[str]:
    """Names accepted by `load`."""
    return sorted(p.name[:-4] for p in resources.files(__package__).iterdir() if p.name.endswith(".csv"))


def load(name: str) -> pd.DataFrame:
    """Load a bundled dataset as a DataFrame; grouping factors come back as strings."""
    names = available()
    match = {n.lower(): n for n in names}.get(name.lower())
    if match is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(names)}")
    with resources.files(__package__).joinpath(f"{match}.csv").open("r") as fh:
        df = pd.read_csv(fh, dtype={c: str for c in _CATEGORICAL.get(match, [])})
    return df
