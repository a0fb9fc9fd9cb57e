"""Small datasets bundled with lmmarg (CSV files copied from lme4 1.1-31 and the NeurIPS 2024 paper's repo).

``cbpp`` and ``VerbAgg`` are lme4 1.1-31's data sets written with ``write.csv(row.names = FALSE)``;
VerbAgg keeps Anger, Gender, item, resp, id, btype, situ, mode, r2 plus ``r2num = as.integer(r2 == "Y")``.

>>> from lmmarg import datasets
>>> datasets.load("sleepstudy").shape
(180, 3)
"""
from __future__ import annotations

from importlib import resources

import pandas as pd

__all__ = ["load", "available"]

# grouping factors (and factor columns) are categorical whatever their dtype in the CSV
_CATEGORICAL = {
    "sleepstudy": ["Subject"],
    "Penicillin": ["plate", "sample"],
    "Pastes": ["batch", "cask", "sample"],
    "Dyestuff": ["Batch"],
    "grouseticks": ["INDEX", "BROOD", "YEAR", "LOCATION"],
    "cbpp": ["herd", "period"],
    # Gender/btype/situ/mode are fixed-effect factors; read as str like the grouping factors
    "VerbAgg": ["item", "id", "btype", "situ", "mode", "Gender", "resp", "r2"],
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
