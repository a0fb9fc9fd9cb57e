"""Sufficient statistics streamed from data sources (lmmarg.sources): Parquet and CSV files, directories, globs,
lists, pyarrow datasets, DataFrames and Dask DataFrames (on a distributed cluster and on dask's default scheduler)
give the same engine arrays; missing values; errors naming the file and column."""
import pickle
import sys

import numpy as np
import pandas as pd
import pytest

from lmmarg import sufficient as su
from lmmarg.design import DesignError
from lmmarg.sources import is_source, sufficient_statistics

pa = pytest.importorskip("pyarrow")
import pyarrow.dataset as ds  # noqa: E402

F = "y ~ x + c + (x | a) + (1 | b)"
FIELDS = ("codes", "cell_n", "S_zz", "S_zr", "S_zX", "XtX", "Xtr", "rr")
N, FILES = 5000, 4


def make_data(seed=1):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, N)
    df = pd.DataFrame({"x": rng.normal(size=N),
                       "c": pd.Categorical(rng.choice(["lo", "mid", "hi"], N), categories=["mid", "lo", "hi"]),
                       "a": np.array([f"s{i:02d}" for i in a], dtype=object), "b": rng.integers(0, 9, N),
                       "unused": rng.normal(size=N)})
    df.loc[3 * N // FILES + 10: 3 * N // FILES + 40, "a"] = "only_in_file_3"   # a level that one file holds
    df["y"] = 2 + 0.5 * df.x + rng.normal(size=60)[a] * (1 + 0.3 * df.x) + rng.normal(size=9)[df.b] \
        + rng.normal(size=N)
    return df


def pieces(df):
    cut = np.linspace(0, len(df), FILES + 1).astype(int)
    return [df.iloc[cut[i]:cut[i + 1]] for i in range(FILES)]


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def files(data, tmp_path_factory):
    """{kind: [paths]}: the data as FILES Parquet files (small row groups), CSV files and gzipped CSV files."""
    root = tmp_path_factory.mktemp("sources")
    out = {"parquet": [], "csv": [], "csv.gz": []}
    for kind in out:
        (root / kind.replace(".", "_")).mkdir()
    for i, part in enumerate(pieces(data)):
        p = root / "parquet" / f"part{i}.parquet"
        part.to_parquet(p, row_group_size=300, index=False)
        out["parquet"].append(p)
        for kind in ("csv", "csv.gz"):
            q = root / kind.replace(".", "_") / f"part{i}.{kind}"
            part.to_csv(q, index=False)
            out[kind].append(q)
    (root / "parquet" / "_SUCCESS").write_text("")   # skipped, as pyarrow skips it
    return out


@pytest.fixture(scope="module")
def reference(data):
    """Statistics of the whole data in one chunk: with the categorical c, and with c as strings (what CSV holds)."""
    cat = su.chunk_statistics(su.design_spec(F, [data]), data)
    text = data.assign(c=data.c.astype(str).astype(object))
    return {"cat": cat, "str": su.chunk_statistics(su.design_spec(F, [text]), text)}


def assert_same(stats, ref, rtol=1e-10):
    """Engine arrays equal field by field at ref's OLS β, to rtol relative to each array's scale."""
    er = ref.engine_arrays()
    es = stats.engine_arrays(beta0=er.beta0)
    assert stats.n_obs == ref.n_obs and es.levels == er.levels and es.names == er.names
    for k in FIELDS:
        A, B = np.asarray(getattr(er, k), dtype=float), np.asarray(getattr(es, k), dtype=float)
        assert A.shape == B.shape, k
        scale = np.sqrt(np.max(np.abs(er.XtX)) * float(er.rr)) if k == "Xtr" else np.max(np.abs(A), initial=1e-300)
        np.testing.assert_allclose(B, A, rtol=0, atol=rtol * scale, err_msg=k)


@pytest.mark.parametrize("how", ["file", "dir", "glob", "list", "tuple", "dataset", "in-memory-dataset", "dataframe",
                                 "dataframes", "small-batches", "reversed"])
def test_parquet_sources_agree(files, data, reference, how):
    paths = files["parquet"]
    root = paths[0].parent
    source, kwargs = {
        "file": (str(paths[0]), {}), "dir": (root, {}), "glob": (str(root / "part*.parquet"), {}),
        "list": ([str(p) for p in paths], {}), "tuple": (tuple(paths), {}),
        "dataset": (ds.dataset([str(p) for p in paths], format="parquet"), {}),
        "in-memory-dataset": (ds.dataset(pa.Table.from_pandas(data, preserve_index=False)), {"batch_rows": 1024}),
        "dataframe": (data, {"batch_rows": 700}), "dataframes": (pieces(data), {}),
        "small-batches": (root, {"batch_rows": 257}), "reversed": (paths[::-1], {"batch_rows": 1000})}[how]
    stats = sufficient_statistics(F, source, **kwargs)
    if how == "file":
        first = pieces(data)[0]
        assert_same(stats, su.chunk_statistics(su.design_spec(F, [first]), first))
        assert stats.source_summary.startswith(f"read {len(first):,} rows from 1 file: 2 terms, ")
        return
    assert_same(stats, reference["cat"])
    assert "only_in_file_3" in dict(zip(stats.meta["factors"], stats.factor_levels))["a"]
    if how in ("dir", "glob", "list"):
        assert stats.source_summary == (f"read 5,000 rows from 4 files: 2 terms, 70 groups, {stats.n_cells:,} "
                                        f"cells") == f"read 5,000 rows from 4 files: {stats.describe()}"


@pytest.mark.parametrize("dense_bytes", [0.0, 1e12])
def test_merged_and_dense_accumulation_agree(files, reference, monkeypatch, dense_bytes):
    """The sums pass adds batches into an array over every possible cell when it fits (DENSE_CELL_BYTES), else by
    n-ary merges of batches (MERGE_CELLS at a time): both give the reference statistics."""
    from lmmarg import sources
    monkeypatch.setattr(sources, "DENSE_CELL_BYTES", dense_bytes)
    monkeypatch.setattr(sources, "MERGE_CELLS", 50)   # many merges of small groups of batches
    stats = sufficient_statistics(F, files["parquet"][0].parent, batch_rows=300)
    assert_same(stats, reference["cat"])


@pytest.mark.parametrize("kind", ["csv", "csv.gz"])
def test_csv_and_mixed_sources(files, reference, kind):
    paths = files[kind]
    assert_same(sufficient_statistics(F, paths[0].parent, batch_rows=999), reference["str"])
    # Parquet and CSV files in one list: the categorical c of the Parquet files meets the strings of the CSV files
    mixed = sufficient_statistics(F, [files["parquet"][0]] + paths[1:])
    assert_same(mixed, reference["str"])


def test_halves_merge_and_save_load(files, reference, tmp_path):
    paths = files["parquet"]
    s1 = sufficient_statistics(F, paths[:2])
    s2 = sufficient_statistics(F, paths[2:])   # its own levels (only_in_file_3) and its own centre
    assert "only_in_file_3" not in s1.factor_levels[0]
    assert_same(s1 + s2, reference["cat"])
    assert_same(s2 + s1, reference["cat"])
    whole = s1 + s2
    whole.save(tmp_path / "stats.npz")
    back = su.load_statistics(tmp_path / "stats.npz")
    assert_same(back, reference["cat"])
    for part in ("X", "Z", "y"):
        for f in su.ColumnMoments.FIELDS:
            np.testing.assert_array_equal(getattr(getattr(back.moments, part), f),
                                          getattr(getattr(whole.moments, part), f))
    assert back.formula == F and back.design_spec is None and whole.design_spec is not None


def test_moments_of_a_source(files, data):
    stats = sufficient_statistics(F, files["parquet"], batch_rows=333)
    m = stats.moments
    assert m.X.n.shape == (len(stats.fixed_names),) and m.Z.n.shape == (3,) and m.y.n.shape == (1,)
    np.testing.assert_allclose(m.y.mean, [data.y.mean()], rtol=1e-12)
    np.testing.assert_allclose(m.y.var, [data.y.var()], rtol=1e-12)
    np.testing.assert_allclose(m.Z.var[1], data.x.var(), rtol=1e-12)   # the slope column of (x | a)
    assert list(m.Z.nnz) == [N, N, N] and m.Z.min[0] == m.Z.max[0] == 1.0


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_na_action(tmp_path, data, kind):
    df = data.copy()
    df["x"] = df["x"].astype(float)
    df.loc[[17, 1300, 4000], "x"] = np.nan
    df.loc[[20, 2600], "a"] = None
    df.loc[2700, "y"] = np.inf
    for i, part in enumerate(pieces(df)):
        if kind == "parquet":
            part.to_parquet(tmp_path / f"p{i}.parquet", index=False)
        else:
            part.to_csv(tmp_path / f"p{i}.csv", index=False)
    files = sorted(tmp_path.glob(f"p*.{kind}"))
    with pytest.raises(DesignError, match=rf"column 'x' of file '.*p0\.{kind}' has a missing or non-finite value "
                                          r"at row 17 \(1 in rows 0 to 1,249\).*na_action='drop'"):
        sufficient_statistics(F, files)
    with pytest.raises(DesignError, match=rf"column 'x' of file '.*p1\.{kind}' has .* at row 50 "):
        sufficient_statistics(F, files[1:])
    if kind == "parquet":   # rows counted per file across the batches of a dataset
        with pytest.raises(DesignError, match=r"column 'x' of file '.*p3\.parquet' has .* at row 250 \(1 in rows "
                                              r"240 to 269\)"):
            sufficient_statistics(F, ds.dataset([str(files[3])]), batch_rows=30)
    with pytest.warns(UserWarning, match="dropped 6 of 5,000 rows") as record:
        stats = sufficient_statistics(F, files, na_action="drop")
    assert len(record) == 1
    clean = df.replace([np.inf], np.nan).dropna(subset=["x", "a", "y"])
    if kind == "csv":
        clean = clean.assign(c=clean.c.astype(str).astype(object))
    assert_same(stats, su.chunk_statistics(su.design_spec(F, [clean]), clean))
    assert stats.n_obs == N - 6 and "(dropped 6 rows with missing values)" in stats.source_summary


def test_errors(files, data, tmp_path):
    root = files["parquet"][0].parent
    with pytest.raises(FileNotFoundError, match=r"no Parquet or CSV files match the glob '.*nothing\*\.parquet'"):
        sufficient_statistics(F, str(root / "nothing*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"directory '.*empty' has no Parquet"):
        sufficient_statistics(F, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: '.*missing\.parquet'"):
        sufficient_statistics(F, tmp_path / "missing.parquet")
    data.iloc[:100].drop(columns="b").to_parquet(tmp_path / "nob.parquet")
    with pytest.raises(DesignError, match=r"file '.*nob\.parquet' has no column 'b' \(used by the formula\)"):
        sufficient_statistics(F, [files["parquet"][0], tmp_path / "nob.parquet"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DesignError, match=r"cannot read '.*notes\.txt'.*Parquet"):
        sufficient_statistics(F, tmp_path / "notes.txt")
    for bad in (42, np.zeros((3, 2))):
        with pytest.raises(TypeError, match=r"cannot read statistics from a .*; a source is a pandas DataFrame, a "
                                            r"path to a Parquet"):
            sufficient_statistics(F, bad)
    with pytest.raises(ValueError, match="na_action must be"):
        sufficient_statistics(F, data, na_action="omit")
    with pytest.raises(DesignError, match="stateful transform"):
        sufficient_statistics("y ~ scale(x) + (1 | a)", root)
    with pytest.raises(DesignError, match=r"the DataFrame has no column 'b' \(used by the formula\)"):
        sufficient_statistics(F, [data, data.drop(columns="b")])
    new = data.copy()
    new.loc[5, "c"] = np.nan
    with pytest.raises(DesignError, match=r"column 'c' of the DataFrame has a missing .* at row 5 "):
        sufficient_statistics(F, new)


def test_is_source(files, data):
    p = files["parquet"][0]
    for yes in (str(p), p, "data/*.parquet", [p, data], (str(p),), ds.dataset(str(p))):
        assert is_source(yes)
    for no in (data, {"x": [1.0]}, 42, [], [42], None, np.zeros(3)):
        assert not is_source(no)


def test_progress_bar_and_summary(files, capsys):
    stats = sufficient_statistics(F, files["parquet"], progress=True, batch_rows=500)
    err = capsys.readouterr().err
    assert "lmmarg levels" in err and "lmmarg sums" in err and "kB of" in err
    assert err.rstrip().endswith(stats.source_summary)
    sufficient_statistics(F, files["parquet"], progress=False)
    sufficient_statistics(F, files["parquet"])   # progress=None: stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_levels_pass_runs_anywhere(data):
    """chunk_levels / ChunkLevels.__add__ in any grouping equal design_spec's levels; the sample is the first
    non-empty chunk's first SAMPLE_ROWS rows; the DesignSpec pickles (it travels to Dask workers)."""
    chunks = [data.iloc[:0]] + pieces(data)
    parts = [su.chunk_levels(F, c, i) for i, c in enumerate(chunks)]
    tree = (parts[0] + parts[1]) + ((parts[2] + parts[3]) + parts[4])
    assert tree.levels() == su.collect_levels(F, chunks) == su.design_spec(F, chunks).levels
    assert tree.n_rows == N and len(tree.sample) == su.SAMPLE_ROWS
    np.testing.assert_array_equal(tree.sample["x"], data.x[:su.SAMPLE_ROWS])
    assert list(tree.sample["a"]) == list(data.a[:su.SAMPLE_ROWS]) and "unused" not in tree.sample.columns
    spec = su.design_spec_from_levels(F, tree)
    back = pickle.loads(pickle.dumps(spec))
    assert_same(su.chunk_statistics(back, data), su.chunk_statistics(spec, data), rtol=1e-14)


# --------------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A Client on the module's cluster, closed after the test (so that other tests see no active client)."""
    distributed = pytest.importorskip("distributed")
    with distributed.Client(cluster) as c:
        yield c


def test_dask_default_scheduler(data, reference):
    dd = pytest.importorskip("dask.dataframe")
    ddf = dd.from_pandas(data, npartitions=4)
    stats = sufficient_statistics(F, ddf)
    assert_same(stats, reference["cat"])
    assert stats.source_summary.startswith("read 5,000 rows from 4 Dask partitions: 2 terms, 70 groups")


def test_dask_distributed(client, data, files, reference):
    dd = pytest.importorskip("dask.dataframe")
    distributed = pytest.importorskip("distributed")
    with distributed.get_task_stream(client) as tasks:
        stats = sufficient_statistics(F, dd.from_pandas(data, npartitions=4), progress=True)
    assert_same(stats, reference["cat"])
    names = {t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in tasks.data}
    assert sum(str(k).startswith("_sums_part") for k in names) == 4   # one task per partition on the workers
    from_files = sufficient_statistics(F, dd.read_parquet([str(p) for p in files["parquet"]]))
    assert_same(from_files, reference["cat"])
    bad = dd.from_pandas(data.assign(x=np.where(np.arange(N) == 3000, np.nan, data.x)), npartitions=4)
    with pytest.raises(DesignError, match=r"column 'x' of partition 2 has a missing or non-finite value at row 500 "):
        sufficient_statistics(F, bad)
    with pytest.warns(UserWarning, match="dropped 1 of 5,000 rows"):
        assert sufficient_statistics(F, bad, na_action="drop").n_obs == N - 1
    with pytest.raises(DesignError, match=r"the Dask DataFrame has no column 'b'"):
        sufficient_statistics(F, dd.from_pandas(data.drop(columns="b"), npartitions=2))


def test_dask_missing_names_the_extra(monkeypatch, data):
    """Without dask installed, a Dask-like source asks for the extra by name."""
    fake = type("DataFrame", (), {"__module__": "dask.dataframe.fake", "npartitions": 2,
                                  "to_delayed": lambda self: [], "columns": list(data.columns)})()
    assert is_source(fake)
    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(ImportError, match=r"pip install lmmarg\[dask\]"):
        sufficient_statistics(F, fake)
