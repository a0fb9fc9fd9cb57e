"""Data sources streamed into sufficient statistics (issue #29): data larger than memory, read in batches.

``sufficient_statistics(formula, source)`` makes two passes over ``source`` with ``lmmarg.sufficient``'s pure chunk
functions: the levels pass (``chunk_levels`` per batch, merged; then ``design_spec_from_levels``) and the sums pass
(``chunk_statistics`` per batch, merged). Sources:

- a pandas DataFrame (sliced into batches of ``batch_rows``);
- a path (str or os.PathLike) to a Parquet (.parquet, .pq) or CSV (.csv, .csv.gz) file; a directory (its Parquet
  and CSV files, sorted, not recursing; names starting with "." or "_" are skipped, as pyarrow skips them); a glob
  string ("data/part-*.parquet"); a list or tuple of any of these, DataFrames and pyarrow datasets (in order);
- a ``pyarrow.dataset.Dataset`` (its batches in fragment order);
- a ``dask.dataframe.DataFrame``: the chunk functions run on the workers, one task per partition and a tree
  reduction (``SPLIT_EVERY`` operands per merge) for both passes, on the active ``distributed`` Client if there is
  one, else on dask's default scheduler. The driver receives the merged statistics and the levels pass's sample
  (≤ ``lmmarg.sufficient.SAMPLE_ROWS`` rows of the first non-empty partition: its OLS β is the provisional centre
  of the sums) and no other row. Dask is an optional extra: ``pip install lmmarg[dask]``.

Files are read by ``pyarrow.dataset`` scanners that load only the formula's columns, in batches of ``batch_rows``:
memory holds the statistics (groups and cells) plus a batch, never the N rows. Each file is scanned on its own, so
that a file lacking a column of the formula is named (a dataset would fill the column with nulls). CSV files are
read with pyarrow's type inference per file; empty strings and "NA"-like values are missing.

Missing values (None, NaN, and ±inf in numeric columns, as ``lmmarg.Model``'s na_action reads them) in the formula's
columns: na_action="raise" names the column, the file (or DataFrame / partition) and the row within it;
"drop" drops those rows in both passes and warns once with the total.

Progress: a tqdm bar per pass ("levels", "sums") over rows, with the bytes read (Parquet: the files' sizes, pro rata
per batch; CSV: per file), then one summary line on stderr, e.g. "read 2,000,000 rows from 8 files: 3 terms,
10,050 groups, 412,300 cells"; the same line is the result's ``source_summary``.

Memory and merging: the sums pass adds each batch's cells into one array over every possible cell (the product of
the grouping factors' levels) when that array fits in ``DENSE_CELL_BYTES``, else it merges batches ``MERGE_CELLS``
cells at a time (``lmmarg.sufficient.merge_many``); either way the result is the same statistics.

Public: sufficient_statistics, is_source, SPLIT_EVERY, MERGE_CELLS, DENSE_CELL_BYTES.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._warnings import warn_user
from .design import DesignError, normalize_dtypes
from .sufficient import (SufficientStatistics, chunk_levels, chunk_statistics, design_spec_from_levels, merge_many,
                         formula_columns)

__all__ = ["sufficient_statistics", "is_source", "SPLIT_EVERY", "MERGE_CELLS", "DENSE_CELL_BYTES"]

SPLIT_EVERY = 8   # operands per merge task of the Dask tree reduction
MERGE_CELLS = 1_000_000   # batches' cells that wait for one n-ary merge (at least the merged total's)
DENSE_CELL_BYTES = 1.5e9  # largest array over every possible cell that the sums pass accumulates into
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv"}
_ACCEPTED = ("a pandas DataFrame, a path to a Parquet (.parquet, .pq) or CSV (.csv, .csv.gz) file, a directory of "
             "them, a glob string, a list/tuple of these, a pyarrow.dataset.Dataset or a dask.dataframe.DataFrame")


def _is_dask(obj) -> bool:
    return (type(obj).__module__ or "").startswith("dask") and hasattr(obj, "to_delayed") \
        and hasattr(obj, "npartitions")


def _is_dataset(obj) -> bool:
    if "pyarrow.dataset" not in sys.modules:   # no pyarrow dataset can exist before its module is imported
        return False
    import pyarrow.dataset as ds
    return isinstance(obj, ds.Dataset)


def is_source(obj) -> bool:
    """True for what :func:`sufficient_statistics` streams without holding it: a path (str, os.PathLike), a glob, a
    list/tuple of sources, a pyarrow Dataset, a Dask DataFrame. False for a pandas DataFrame or a dict (in memory:
    ``lmmarg.Model`` fits their rows) and anything else."""
    if isinstance(obj, (str, os.PathLike)):
        return True
    if isinstance(obj, (list, tuple)):
        return len(obj) > 0 and all(isinstance(o, pd.DataFrame) or (is_source(o) and not _is_dask(o)) for o in obj)
    return _is_dataset(obj) or _is_dask(obj)


# --------------------------------------------------------------------------- what to read


@dataclass(frozen=True)
class _File:
    path: str
    format: str   # "parquet" or "csv"
    size: int


def _format_of(path: str):
    low = path.lower()
    return next((f for s, f in _SUFFIXES.items() if low.endswith(s)), None)


def _files_of_path(source) -> list[_File]:
    """The files a path, directory or glob names (sorted; FileNotFoundError when none)."""
    path = os.fspath(source)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith((".", "_")) and _format_of(n)
                       and os.path.isfile(os.path.join(path, n)))
        if not names:
            raise FileNotFoundError(f"the directory {path!r} has no Parquet (.parquet, .pq) or CSV (.csv, .csv.gz) "
                                    "files")
        paths = [os.path.join(path, n) for n in names]
    elif os.path.isfile(path):
        if _format_of(path) is None:
            raise DesignError(f"cannot read {path!r}: lmmarg streams Parquet (.parquet, .pq) and CSV (.csv, .csv.gz) "
                              "files")
        paths = [path]
    elif glob.has_magic(path):
        paths = sorted(p for p in glob.glob(path) if os.path.isfile(p) and _format_of(p))
        if not paths:
            raise FileNotFoundError(f"no Parquet or CSV files match the glob {path!r}")
    else:
        raise FileNotFoundError(f"no such file or directory: {path!r}")
    return [_File(p, _format_of(p), os.path.getsize(p)) for p in paths]


def _parts(source) -> list:
    """The source as a list of parts read one after the other: _File, pandas DataFrame, pyarrow Dataset."""
    if isinstance(source, pd.DataFrame) or _is_dataset(source):
        return [source]
    if isinstance(source, (str, os.PathLike)):
        return _files_of_path(source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("the list of sources is empty")
        out = []
        for item in source:
            if _is_dask(item) or isinstance(item, (list, tuple)):
                raise TypeError(f"a list of sources holds paths, globs, DataFrames and pyarrow datasets, not "
                                f"{type(item).__name__}; pass a Dask DataFrame on its own")
            out += _parts(item)
        return out
    raise TypeError(f"cannot read statistics from a {type(source).__module__}.{type(source).__name__}; a source is "
                    f"{_ACCEPTED}")


def _pyarrow():
    try:
        import pyarrow.csv as pacsv
        import pyarrow.dataset as ds
    except ImportError:
        raise ImportError("reading Parquet and CSV files needs pyarrow: pip install lmmarg[parquet]") from None
    return ds, pacsv


def _file_dataset(f: _File):
    ds, pacsv = _pyarrow()
    fmt = ds.ParquetFileFormat() if f.format == "parquet" else ds.CsvFileFormat(
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    return ds.dataset(f.path, format=fmt)


@dataclass
class _Batch:
    frame: pd.DataFrame | None   # None: no rows, progress only
    where: str      # "file '/d/a.parquet'", "the DataFrame", ...
    start: int      # the batch's first row within its file / DataFrame / fragment
    nbytes: float   # bytes of input this batch accounts for (progress)


def _rebatch(batches, rows: int):
    """Arrow record batches regrouped into tables of ``rows`` rows (the last one shorter): small row groups are
    coalesced, so that each chunk function call has enough rows to be worth its overhead."""
    import pyarrow as pa
    buf, n = [], 0
    for b in batches:
        if b.num_rows == 0:
            continue
        buf.append(b)
        n += b.num_rows
        while n >= rows:
            table = pa.Table.from_batches(buf)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf)


def _batches(part, formula, batch_rows: int):
    """Yield the _Batch list of one part (only the formula's columns, in order)."""
    if isinstance(part, pd.DataFrame):
        df, where = part.rename(columns=str), "the DataFrame"
        names = list(df.columns)
    elif isinstance(part, _File):
        dataset, where = _file_dataset(part), f"file {part.path!r}"
        names = list(dataset.schema.names)
    else:
        dataset, where = part, "the pyarrow dataset"
        names = list(dataset.schema.names)
    used = formula_columns(formula, names)
    absent = [c for c in used if c not in names]
    if absent:
        raise DesignError(f"{where} has no column {absent[0]!r} (used by the formula); its columns are {names}")
    if isinstance(part, pd.DataFrame):
        for start in range(0, max(len(df), 1), batch_rows):
            yield _Batch(df.iloc[start:start + batch_rows][list(used)], where, start, 0.0)
        return
    if isinstance(part, _File):
        total = dataset.count_rows() if part.format == "parquet" else 0   # Parquet: from the footers
        start = 0
        for table in _rebatch(dataset.scanner(columns=list(used), batch_size=batch_rows).to_batches(), batch_rows):
            yield _Batch(table.to_pandas(), where, start, part.size * table.num_rows / total if total else 0.0)
            start += table.num_rows
        if not total:   # CSV (or an empty Parquet file): its bytes when it is done
            yield _Batch(None, where, start, float(part.size))
        return
    tagged = dataset.scanner(columns=list(used), batch_size=batch_rows).scan_batches()
    # consecutive batches of one file (an in-memory dataset has no paths: its rows are counted as one)
    for frag, group in itertools.groupby(tagged, key=lambda t: getattr(t.fragment, "path", None)):
        label, start = f"file {frag!r}" if frag else where, 0
        for table in _rebatch((t.record_batch for t in group), batch_rows):
            yield _Batch(table.to_pandas(), label, start, 0.0)
            start += table.num_rows


# --------------------------------------------------------------------------- missing values


def _missing(df: pd.DataFrame, used) -> np.ndarray:
    """(n,) bool: rows with a missing (None, NaN) or non-finite value in a used column."""
    bad = np.zeros(len(df), bool)
    for col in used:
        if col not in df.columns:
            continue
        s = df[col]
        bad |= s.isna().to_numpy()
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            bad |= ~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
    return bad


def _clean(df: pd.DataFrame, formula, na_action: str, where: str, start: int) -> tuple[pd.DataFrame, int]:
    """(the batch without rows with missing values, rows dropped); raise naming the column, place and row under
    na_action="raise"."""
    df = df.rename(columns=str)
    used = [c for c in formula_columns(formula, df.columns) if c in df.columns]
    df = normalize_dtypes(df.reset_index(drop=True), used)
    bad = _missing(df, used)
    if not bad.any():
        return df, 0
    if na_action == "drop":
        return df.loc[~bad].reset_index(drop=True), int(bad.sum())
    for col in used:
        mask = _missing(df, [col])
        if mask.any():
            raise DesignError(f"column {col!r} of {where} has a missing or non-finite value at row "
                              f"{start + int(np.flatnonzero(mask)[0]):,} ({int(mask.sum()):,} in rows {start:,} to "
                              f"{start + len(df) - 1:,}); clean the data or pass na_action='drop'")
    raise AssertionError("unreachable")  # pragma: no cover


def _label(where: str, start: int, n: int) -> str:
    return f"{where} (rows {start:,} to {start + max(n, 1) - 1:,})"


def _levels_part(formula, df, na_action, where, start):
    """(ChunkLevels, rows read, rows dropped) of one batch: the Dask task of the levels pass."""
    n = len(df)
    df, dropped = _clean(df, formula, na_action, where, start)
    return chunk_levels(formula, df, _label(where, start, n)), n, dropped


def _sums_part(spec, formula, df, na_action, where, start):
    """(SufficientStatistics, rows read, rows dropped) of one batch: the Dask task of the sums pass."""
    n = len(df)
    df, dropped = _clean(df, formula, na_action, where, start)
    return chunk_statistics(spec, df, _label(where, start, n)), n, dropped


def _rows_of(part) -> int:
    return part[1]


def _merge_parts(*parts):
    """The merge of (result, rows, dropped) triples, in order (associative: the tree reduction's step); statistics
    in one n-ary merge (``lmmarg.sufficient.merge_many``)."""
    first = parts[0][0]
    if isinstance(first, SufficientStatistics):
        merged = merge_many([p[0] for p in parts])
    else:
        merged = first
        for p in parts[1:]:
            merged = merged + p[0]
    return merged, sum(p[1] for p in parts), sum(p[2] for p in parts)


class _CellAccumulator:
    """The sums pass's total in one array over every possible cell (the mixed-radix key of the grouping factors'
    codes, all levels known after the levels pass): each batch's cells are scatter-added once, where merging
    batches into a growing total re-sums the total at every merge (at ~10 rows per cell a batch barely compresses).
    Used when the possible cells fit in ``DENSE_CELL_BYTES``; batches of one DesignSpec share the factor levels and
    the centre, so their sums add as they are. Columns per cell: rows, S_zz (D²), S_zr (D), S_zX (D p), so that a
    batch is one fancy-index add."""

    def __init__(self, first: SufficientStatistics):
        self.sizes = [len(v) for v in first.factor_levels]
        self.strides = (np.cumprod([1] + self.sizes[::-1][:-1])[::-1].astype(np.int64) if self.sizes
                        else np.zeros(0, np.int64))
        self.D, self.p = first.S_zz.shape[1], first.XtX.shape[0]
        n = int(np.prod(self.sizes)) if self.sizes else 1
        self.first, self.parts = first, []
        self.acc = np.zeros((n, _CellAccumulator.width(first)))

    @staticmethod
    def width(first: SufficientStatistics) -> int:
        D, p = first.S_zz.shape[1], first.XtX.shape[0]
        return 1 + D * D + D + D * p

    @staticmethod
    def bytes_needed(first: SufficientStatistics) -> float:
        n = float(np.prod([float(len(v)) for v in first.factor_levels])) if first.factor_levels else 1.0
        return n * 8.0 * _CellAccumulator.width(first)

    def add(self, s: SufficientStatistics) -> None:
        if s.factor_levels != self.first.factor_levels:   # one DesignSpec: never; a guard, not a merge
            raise ValueError("batches of one sums pass have different grouping levels")
        m = s.n_cells
        key = s.cell_factors @ self.strides if self.sizes else np.zeros(m, np.int64)
        block = np.concatenate([s.cell_n[:, None].astype(float), s.S_zz.reshape(m, -1), s.S_zr,
                                s.S_zX.reshape(m, -1)], axis=1)
        self.acc[key] += block             # a batch's cells are unique: a plain fancy-index add is exact
        # the global sums and moments: the batch itself without its cells (merged at the end)
        self.parts.append(dataclasses.replace(s, cell_factors=s.cell_factors[:0], cell_n=s.cell_n[:0],
                                              S_zz=s.S_zz[:0], S_zr=s.S_zr[:0], S_zX=s.S_zX[:0]))
        if len(self.parts) >= 64:
            self.parts = [merge_many(self.parts)]

    def result(self) -> SufficientStatistics:
        total = merge_many(self.parts)
        obs = np.flatnonzero(self.acc[:, 0] > 0)
        rows = self.acc[obs]
        D, p, n = self.D, self.p, len(obs)
        codes = (np.stack(np.unravel_index(obs, self.sizes), 1).astype(np.int64) if self.sizes
                 else np.zeros((n, 0), np.int64))
        a, b, c = 1 + D * D, 1 + D * D + D, 1 + D * D + D + D * p
        return dataclasses.replace(total, cell_factors=codes, cell_n=np.rint(rows[:, 0]).astype(np.int64),
                                   S_zz=rows[:, 1:a].reshape(n, D, D), S_zr=rows[:, a:b].copy(),
                                   S_zX=rows[:, b:c].reshape(n, D, p))


# --------------------------------------------------------------------------- progress


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


class _Progress:
    """A tqdm bar over rows (with bytes read when known), or nothing when off."""

    def __init__(self, show: bool, label: str, total_rows, total_bytes):
        self.bar, self.total_bytes, self.bytes = None, total_bytes, 0.0
        if show:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_rows, desc=f"lmmarg {label}", unit=" rows", unit_scale=True, file=sys.stderr,
                            leave=False)

    def update(self, rows: int, nbytes: float = 0.0) -> None:
        if self.bar is None:
            return
        self.bytes += nbytes
        if self.total_bytes:
            self.bar.set_postfix_str(f"{_size(self.bytes)} of {_size(self.total_bytes)}", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the two passes


def _local(formula, parts, family, na_action, batch_rows, show, total_rows, total_bytes):
    """(statistics, rows read, rows dropped) of parts read here, batch by batch."""
    def run(label, task):
        bar, out, acc = _Progress(show, label, total_rows, total_bytes), None, None
        rows = dropped = 0
        try:
            pending, cells = [], 0   # batches' results not merged yet, and their cells
            for part in parts:
                for b in _batches(part, formula, batch_rows):
                    if b.frame is None:
                        bar.update(0, b.nbytes)
                        continue
                    r = task(b)
                    if isinstance(r[0], SufficientStatistics) and (
                            acc is not None or _CellAccumulator.bytes_needed(r[0]) <= DENSE_CELL_BYTES):
                        acc = acc or _CellAccumulator(r[0])
                        acc.add(r[0])
                        rows, dropped = rows + r[1], dropped + r[2]
                        bar.update(r[1], b.nbytes)
                        continue
                    pending.append(r)
                    cells += getattr(r[0], "n_cells", 0)
                    # merge when the pending cells reach the merged total's (amortized O(total cells), memory at
                    # most about twice the statistics) or many small batches wait
                    if cells >= max(MERGE_CELLS, getattr(out and out[0], "n_cells", 0)) or len(pending) >= 64:
                        out = _merge_parts(*([out] if out is not None else []), *pending)
                        pending, cells = [], 0
                    bar.update(r[1], b.nbytes)
            if pending:
                out = _merge_parts(*([out] if out is not None else []), *pending)
            if acc is not None:
                out = (acc.result(), rows, dropped)
        finally:
            bar.close()
        if out is None:
            raise DesignError("the source holds no rows")
        return out

    levels = run("levels", lambda b: _levels_part(formula, b.frame, na_action, b.where, b.start))[0]
    spec = design_spec_from_levels(formula, levels, family)
    return run("sums", lambda b: _sums_part(spec, formula, b.frame, na_action, b.where, b.start))


def _dask():
    try:
        import dask
    except ImportError:
        raise ImportError("statistics of a Dask DataFrame need dask: pip install lmmarg[dask]") from None
    return dask


def _client():
    """The active distributed Client, or None (dask's default scheduler)."""
    try:
        from distributed import default_client
        return default_client()
    except (ImportError, ValueError):
        return None


def _dask_pass(dask, leaves, show, label):
    """Merge the delayed (result, rows, dropped) leaves by a tree reduction on the workers; the merged triple."""
    nodes = list(leaves)
    while len(nodes) > 1:
        nodes = [dask.delayed(_merge_parts, pure=True)(*nodes[i:i + SPLIT_EVERY])
                 for i in range(0, len(nodes), SPLIT_EVERY)]
    bar = _Progress(show, label, None, 0)
    try:
        client = _client()
        if client is None:
            from dask.callbacks import Callback
            keys = {str(leaf.key) for leaf in leaves}

            def posttask(key, result, dsk, state, worker_id):
                if str(key) in keys:
                    bar.update(result[1])

            with Callback(posttask=posttask):   # unfused, so that the leaves keep their keys
                return dask.compute(nodes[0], optimize_graph=False)[0]
        from distributed import as_completed
        rows = [dask.delayed(_rows_of, pure=True)(leaf) for leaf in leaves]
        futures = client.compute([nodes[0]] + rows)
        for fut in as_completed(futures[1:]):
            bar.update(fut.result())
            fut.release()
        return futures[0].result()
    finally:
        bar.close()


def _from_dask(formula, ddf, family, na_action, show):
    dask = _dask()
    names = [str(c) for c in ddf.columns]
    used = formula_columns(formula, names)
    absent = [c for c in used if c not in names]
    if absent:
        raise DesignError(f"the Dask DataFrame has no column {absent[0]!r} (used by the formula); its columns are "
                          f"{names}")
    parts = ddf[list(used)].to_delayed()
    where = [f"partition {i}" for i in range(len(parts))]
    levels = _dask_pass(dask, [dask.delayed(_levels_part, pure=True)(formula, p, na_action, w, 0)
                               for p, w in zip(parts, where)], show, "levels")[0]
    spec = design_spec_from_levels(formula, levels, family)
    return _dask_pass(dask, [dask.delayed(_sums_part, pure=True)(spec, formula, p, na_action, w, 0)
                             for p, w in zip(parts, where)], show, "sums")


def _describe_parts(parts) -> str:
    files = sum(isinstance(p, _File) for p in parts)
    frames = sum(isinstance(p, pd.DataFrame) for p in parts)
    sets = len(parts) - files - frames
    out = [f"{k:,} {name}{'s' * (k != 1)}" for k, name in ((files, "file"), (frames, "DataFrame"),
                                                          (sets, "pyarrow dataset")) if k]
    return " and ".join(out)


def sufficient_statistics(formula, source, *, family: str = "gaussian", na_action: str = "raise",
                          batch_rows: int = 262_144, progress: bool | None = None) -> SufficientStatistics:
    """The :class:`lmmarg.sufficient.SufficientStatistics` of ``formula`` over ``source`` (see the module
    docstring for the sources), in two passes of ``batch_rows`` rows at a time.

    family: "gaussian" or "lognormal" (sums of log y). na_action: "raise" (an error naming the column, the file and
    the row) or "drop" (rows with a missing or non-finite value in a column of the formula are left out; one warning
    with the total). progress: True / False, or None: a bar when a file or Dask source has more than one batch and
    stderr is a terminal. The result's ``source_summary`` is the summary line ("read 2,000,000 rows from 8 files:
    3 terms, 10,050 groups, 412,300 cells"), printed to stderr when progress is on.

    Raises FileNotFoundError when a path, directory or glob names no file, DesignError naming the file and column
    that a file lacks, TypeError for a source of another type."""
    if na_action not in ("raise", "drop"):
        raise ValueError(f"na_action must be 'raise' or 'drop', not {na_action!r}")
    if int(batch_rows) < 1:
        raise ValueError(f"batch_rows must be a positive number of rows, not {batch_rows!r}")
    batch_rows = int(batch_rows)
    if isinstance(source, dict):
        source = pd.DataFrame(source)
    if _is_dask(source):
        what = f"{source.npartitions:,} Dask partition{'s' * (source.npartitions != 1)}"
        show = bool(progress) if progress is not None else (source.npartitions > 1 and sys.stderr.isatty())
        stats, rows, dropped = _from_dask(formula, source, family, na_action, show)
    else:
        parts = _parts(source)
        what = _describe_parts(parts)
        files = [p for p in parts if isinstance(p, _File)]
        total_bytes = sum(f.size for f in files)
        counts = [len(p) if isinstance(p, pd.DataFrame) else _file_dataset(p).count_rows()
                  if isinstance(p, _File) and p.format == "parquet" else None for p in parts]
        total_rows = None if None in counts else sum(counts)   # CSV and datasets: unknown before reading
        streamed = any(not isinstance(p, pd.DataFrame) for p in parts)
        many = len(parts) > 1 or total_rows is None or total_rows > batch_rows
        show = bool(progress) if progress is not None else (streamed and many and sys.stderr.isatty())
        stats, rows, dropped = _local(formula, parts, family, na_action, batch_rows, show, total_rows, total_bytes)
    if stats.n_obs == 0:
        raise DesignError(f"no rows to fit in {what}" + (f" after dropping {dropped:,} rows with missing values"
                                                           if dropped else ""))
    summary = f"read {rows:,} rows from {what}: {stats.describe()}"
    if dropped:
        summary += f" (dropped {dropped:,} rows with missing values)"
        warn_user(f"na_action='drop': dropped {dropped:,} of {rows:,} rows with a missing or non-finite value in "
                  "a column of the formula")
    if show:
        print(summary, file=sys.stderr)
    return dataclasses.replace(stats, source_summary=summary)
