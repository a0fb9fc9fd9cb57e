"""Saved fits (lmmarg.saving): round trips that give identical results, atomic writes that never lose the earlier
file, checksums that catch damage, and a format that loads without running code (pickle only on request).

Three small NUTS fits are built once for the module (a Gaussian fit with user priors and extra data columns of
several dtypes, a float32 fit with sigma_by, a poisson GLMM) plus a MAP fit with a sigma formula."""
import errno
import io
import json
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest

import lmmarg
from lmmarg.priors import LKJ
from lmmarg.results import Fit
from lmmarg.saving import FORMAT_VERSION, DamagedFileError, NotAFitError, SavedFitError, SaveError

SMALL = {"chains": 1, "warmup": 100, "draws": 100, "progress_bar": False}


def _sample(model, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # low ESS of these deliberately short runs
        return model.sample(seed=seed, **SMALL)


@pytest.fixture(scope="module")
def sleep():
    d = lmmarg.datasets.load("sleepstudy")
    n = len(d)
    d = d.assign(Subject=d["Subject"].astype("category"),  # columns of several dtypes travel with the data
                 note=pd.Series([None if i % 3 == 0 else ("x" if i % 2 else i) for i in range(n)], dtype=object),
                 label=d["Subject"].astype(str) + "s",
                 count=pd.array([None if i % 7 == 0 else i for i in range(n)], dtype="Int64"),
                 when=pd.date_range("2024-01-01", periods=n, freq="h"),
                 flag=np.arange(n) % 2 == 0)
    d.loc[5, "note"] = np.nan
    return d


@pytest.fixture(scope="module")
def gauss(sleep):
    priors = {"b_Days": dist.Normal(0.0, 20.0), "sd_Subject__Days": dist.HalfNormal(15.0), "cor": LKJ(2.0)}
    return _sample(lmmarg.Model("Reaction ~ Days + (Days | Subject)", sleep, priors=priors))


@pytest.fixture(scope="module")
def f32_by():
    m = lmmarg.Model("diameter ~ 1 + (1 | plate)", lmmarg.datasets.load("Penicillin"), dtype="float32",
                     sigma_by="sample")
    return _sample(m, seed=1)


@pytest.fixture(scope="module")
def glmm():
    m = lmmarg.Model("TICKS ~ YEAR + (1 | LOCATION)", lmmarg.datasets.load("grouseticks"), family="poisson")
    return _sample(m, seed=2)


@pytest.fixture(scope="module")
def sigma_map():
    m = lmmarg.Model("Reaction ~ Days + (1 | Subject)", lmmarg.datasets.load("sleepstudy"), sigma="~ Days")
    return m.fit_map()


def _roundtrip(fit, tmp_path, name="fit.lmm"):
    path = tmp_path / name
    fit.save(path)
    return lmmarg.load(path)


def _assert_same_predictions(a, b, new):
    for kind in ("response", "mean", "linpred"):
        np.testing.assert_array_equal(a.predict(new, seed=3, kind=kind), b.predict(new, seed=3, kind=kind))


def _assert_same_fit(a, b):
    assert type(b) is Fit and b.method == a.method
    assert a.samples.keys() == b.samples.keys() and a.sample_stats.keys() == b.sample_stats.keys()
    for k in a.samples:
        assert b.samples[k].dtype == a.samples[k].dtype
        np.testing.assert_array_equal(b.samples[k], a.samples[k])
    for k in a.sample_stats:
        np.testing.assert_array_equal(b.sample_stats[k], a.sample_stats[k])
    assert json.dumps(b.diagnostics, default=repr) == json.dumps(a.diagnostics, default=repr)
    pd.testing.assert_frame_equal(b.summary(), a.summary(), check_exact=True)
    pd.testing.assert_frame_equal(b.summary(ranef=True), a.summary(ranef=True), check_exact=True)
    ra, rb = a.ranef(), b.ranef()
    assert ra.keys() == rb.keys()
    for k in ra:
        pd.testing.assert_frame_equal(rb[k], ra[k], check_exact=True)
    # the model: same data, design, priors and working response
    pd.testing.assert_frame_equal(b.model.design.data, a.model.design.data, check_exact=True)
    np.testing.assert_array_equal(b.model.design.X, a.model.design.X)
    np.testing.assert_array_equal(b.model.y, a.model.y)
    assert b.model.dtype == a.model.dtype and b.model.family == a.model.family and b.model.link == a.model.link
    assert str(b.model.priors) == str(a.model.priors)
    for pa, pb in zip(a.model.priors, b.model.priors):
        assert type(pb.dist) is type(pa.dist) and pb.source == pa.source
        np.testing.assert_array_equal(np.asarray(pb.fixed, float), np.asarray(pa.fixed, float))


def _assert_same_loo(a, b):
    la, lb = a.loo(reloo=False, progress=False), b.loo(reloo=False, progress=False)  # no refits: the same draws
    assert lb.elpd_loo == la.elpd_loo and lb.p_loo == la.p_loo
    np.testing.assert_array_equal(np.asarray(lb.loo_i), np.asarray(la.loo_i))


def _assert_same_arviz(a, b):
    ia, ib = a.to_arviz(seed=4), b.to_arviz(seed=4)
    assert ia.groups() == ib.groups()
    for g in ia.groups():
        assert ia[g].equals(ib[g]), g


# -- round trips ------------------------------------------------------------------------------------------------


def test_gaussian_fit_round_trip_is_identical(gauss, sleep, tmp_path):
    back = _roundtrip(gauss, tmp_path)
    _assert_same_fit(gauss, back)
    new = pd.DataFrame({"Days": [0, 5, 9], "Subject": ["308", "new", "372"]})
    _assert_same_predictions(gauss, back, new)
    _assert_same_loo(gauss, back)
    _assert_same_arviz(gauss, back)
    # every data column comes back with its dtype, missing values and categories
    data = back.model.design.data
    assert isinstance(data["Subject"].dtype, pd.CategoricalDtype)
    assert list(data["Subject"].cat.categories) == list(gauss.model.design.data["Subject"].cat.categories)
    assert str(data["count"].dtype) == "Int64" and data["count"].isna().sum() == gauss.model.design.data[
        "count"].isna().sum()
    assert data["note"].dtype == object and data["note"][0] is None and np.isnan(data["note"][5])
    assert type(data["note"][1]) is str and type(data["note"][2]) is int
    assert data["label"].dtype == gauss.model.design.data["label"].dtype
    # user priors restored as data: the NumPyro class and its parameters
    assert isinstance(back.model.priors["b_Days"].dist, dist.Normal)
    assert float(back.model.priors["b_Days"].dist.scale) == 20.0
    assert back.model.priors["cor_Subject"].dist == LKJ(2.0)
    # the loaded model still evaluates its marginal likelihood (kernels rebuilt on demand)
    cov = {"Subject": np.diag([500.0, 30.0])}
    assert back.model.log_marginal([250, 10], 25, cov) == gauss.model.log_marginal([250, 10], 25, cov)


def test_float32_sigma_by_round_trip_is_identical(f32_by, tmp_path):
    back = _roundtrip(f32_by, tmp_path)
    assert back.model.dtype == f32_by.model.dtype and back.samples["beta"].dtype == np.float32
    assert back.model.sigma_spec.kind == "by" and back.model.sigma_spec.by == "sample"
    _assert_same_fit(f32_by, back)
    _assert_same_predictions(f32_by, back, lmmarg.datasets.load("Penicillin").head(7))
    _assert_same_loo(f32_by, back)
    _assert_same_arviz(f32_by, back)


def test_poisson_glmm_round_trip_is_identical(glmm, tmp_path):
    back = _roundtrip(glmm, tmp_path)
    assert back.model.family == "poisson" and back.model.trials is not None
    np.testing.assert_array_equal(back.model.trials, glmm.model.trials)
    _assert_same_fit(glmm, back)
    _assert_same_predictions(glmm, back, lmmarg.datasets.load("grouseticks").head(9))
    _assert_same_loo(glmm, back)


def test_map_fit_with_sigma_formula_round_trip_is_identical(sigma_map, tmp_path):
    back = _roundtrip(sigma_map, tmp_path)
    assert back.model.sigma_spec.kind == "formula" and back.model.sigma_spec.formula == "~ Days"
    _assert_same_fit(sigma_map, back)
    assert back.mode.keys() == sigma_map.mode.keys()
    for k in sigma_map.mode:
        np.testing.assert_array_equal(back.mode[k], sigma_map.mode[k])
    _assert_same_predictions(sigma_map, back, lmmarg.datasets.load("sleepstudy").head(4))


def test_saved_file_holds_data_and_no_pickle(gauss, tmp_path):
    path = tmp_path / "fit.lmm"
    gauss.save(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("lmmarg_fit.json"))
        meta = json.loads(zf.read("meta.json"))
    assert "pickled.pkl" not in names and manifest["pickled"] == []
    assert manifest["format"] == "lmmarg-fit" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["lmmarg_version"] == lmmarg.__version__
    assert set(manifest["members"]) == set(names) - {"lmmarg_fit.json"}
    assert all(len(m["sha256"]) == 64 for m in manifest["members"].values())
    assert meta["model"]["formula"] == "Reaction ~ Days + (Days | Subject)"
    b_days = next(p for p in meta["model"]["priors"] if p["site"] == "b_Days")
    assert b_days["dist"] == {"__dist__": "Normal", "params": {"loc": 0.0, "scale": 20.0}}
    # each array member is a plain .npy file NumPy reads without pickle
    with zipfile.ZipFile(path) as zf:
        arr = np.lib.format.read_array(zf.open(next(n for n in names if n.endswith(".npy"))), allow_pickle=False)
    assert arr.dtype != object


# -- failed saves leave the earlier file intact -----------------------------------------------------------------


def _only_file(tmp_path, path):
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind


def test_save_failing_mid_write_keeps_earlier_file(gauss, glmm, tmp_path, monkeypatch):
    path = tmp_path / "fit.lmm"
    gauss.save(path)
    before = path.read_bytes()
    real = np.lib.format.write_array
    calls = []

    def write_then_fail(fp, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # part of the third array, then the disk is full
            fp.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_then_fail)
    with pytest.raises(SaveError, match="No space left on device.*the earlier file is unchanged") as info:
        glmm.save(path)
    assert isinstance(info.value, OSError) and len(calls) == 3
    monkeypatch.undo()
    assert path.read_bytes() == before
    _only_file(tmp_path, path)
    assert lmmarg.load(path).model.formula == gauss.model.formula


def test_interrupted_save_keeps_earlier_file(gauss, glmm, tmp_path, monkeypatch):
    path = tmp_path / "fit.lmm"
    gauss.save(path)
    before = path.read_bytes()

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        glmm.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    _only_file(tmp_path, path)


def test_save_into_missing_directory_raises_clearly(gauss, tmp_path):
    with pytest.raises(SaveError, match="cannot create a temporary file.*nothing was written"):
        gauss.save(tmp_path / "nope" / "fit.lmm")


def test_save_replaces_the_file_and_keeps_its_permissions(gauss, glmm, tmp_path):
    path = tmp_path / "fit.lmm"
    gauss.save(path)
    os.chmod(path, 0o640)
    glmm.save(path)
    assert (os.stat(path).st_mode & 0o777) == 0o640
    assert lmmarg.load(path).model.family == "poisson"
    _only_file(tmp_path, path)


# -- what cannot be stored as data: pickled on request only -----------------------------------------------------


class CustomNormal(dist.Normal):
    """A user-defined distribution class: it has no data form, so save pickles it."""


def _hand_fit(priors):
    m = lmmarg.Model("Reaction ~ Days + (1 | Subject)", lmmarg.datasets.load("sleepstudy"), priors=priors)
    rng = np.random.default_rng(0)
    samples = {"beta": rng.normal(size=(1, 3, 2)) + [250, 10], "sigma": rng.uniform(20, 30, (1, 3)),
               "sd_Subject": rng.uniform(20, 40, (1, 3, 1)), "u_Subject": rng.normal(size=(1, 3, 18, 1))}
    return Fit(m, samples)


def test_custom_prior_class_is_pickled_and_loads_only_with_allow_pickle(tmp_path):
    fit = _hand_fit({"b_Days": CustomNormal(0.0, 10.0)})
    path = tmp_path / "fit.lmm"
    with pytest.warns(UserWarning, match="prior 'b_Days' dist .*CustomNormal.*allow_pickle=True"):
        fit.save(path)
    with pytest.raises(SavedFitError, match="could only be saved with pickle.*CustomNormal.*runs code"):
        lmmarg.load(path)
    back = lmmarg.load(path, allow_pickle=True)
    assert type(back.model.priors["b_Days"].dist) is CustomNormal
    pd.testing.assert_frame_equal(back.summary(), fit.summary(), check_exact=True)


def test_unpicklable_item_fails_before_touching_the_earlier_file(gauss, tmp_path):
    class LocalNormal(dist.Normal):  # defined in a function: neither data nor picklable
        pass

    path = tmp_path / "fit.lmm"
    gauss.save(path)
    before = path.read_bytes()
    fit = _hand_fit({"b_Days": LocalNormal(0.0, 10.0)})
    with pytest.raises(SaveError, match="prior 'b_Days' dist.*LocalNormal.*cannot be stored as data.*nothing was"):
        fit.save(path)
    assert path.read_bytes() == before
    _only_file(tmp_path, path)


def test_old_pickle_files_load_only_with_allow_pickle(gauss, tmp_path):
    path = tmp_path / "old.pkl"
    with open(path, "wb") as fh:  # what Fit.save wrote in lmmarg 0.1
        pickle.dump(gauss, fh, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(NotAFitError, match="pickle file.*runs code.*allow_pickle=True"):
        lmmarg.load(path)
    back = lmmarg.load(path, allow_pickle=True)
    pd.testing.assert_frame_equal(back.summary(), gauss.summary(), check_exact=True)
    with open(tmp_path / "other.pkl", "wb") as fh:
        pickle.dump({"not": "a fit"}, fh)
    with pytest.raises(NotAFitError, match="holds a dict, not an lmmarg fit"):
        lmmarg.load(tmp_path / "other.pkl", allow_pickle=True)


# -- damaged, truncated and foreign files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(gauss, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "fit.lmm"
    gauss.save(path)
    return path.read_bytes()


def test_flipped_bytes_are_reported_as_damage(saved, tmp_path):
    raw = bytearray(saved)
    mid = len(raw) // 2
    for i in range(mid, mid + 50):
        raw[i] ^= 0xFF
    path = tmp_path / "bad.lmm"
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedFileError, match=re.escape(f"file {path} is damaged: checksum mismatch in member")):
        lmmarg.load(path)


def _rewrite(src: bytes, dst, change):
    """Copy a saved file member by member through ``change(name, bytes) -> bytes`` (zip CRCs recomputed)."""
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, change(name, zin.read(name)))


def test_altered_array_is_a_checksum_mismatch_naming_it(saved, tmp_path):
    path = tmp_path / "bad.lmm"
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(saved)).read("lmmarg_fit.json"))
    target = next(n for n, m in manifest["members"].items() if m["what"] == "samples['u_Subject']")

    def change(name, b):
        if name != target:
            return b
        b = bytearray(b)
        b[-8:] = np.float64(1e-206).tobytes()  # a plausible-looking value: the zip CRC alone would not know
        return bytes(b)

    _rewrite(saved, path, change)
    with pytest.raises(DamagedFileError, match=r"checksum mismatch in member .*samples\['u_Subject'\]"):
        lmmarg.load(path)


def test_truncated_file_is_reported(saved, tmp_path):
    path = tmp_path / "cut.lmm"
    for n in (len(saved) // 2, len(saved) - 10):
        path.write_bytes(saved[:n])
        with pytest.raises(DamagedFileError, match="damaged or truncated"):
            lmmarg.load(path)
    path.write_bytes(b"")
    with pytest.raises(DamagedFileError, match="empty"):
        lmmarg.load(path)


def test_files_that_are_not_fits(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(NotAFitError, match="not an lmmarg fit file"):
        lmmarg.load(text)
    npz = tmp_path / "arrays.npz"
    np.savez(npz, a=np.arange(3))
    with pytest.raises(NotAFitError, match="not an lmmarg fit: a zip file without"):
        lmmarg.load(npz)
    assert issubclass(NotAFitError, TypeError)


def test_newer_format_version_asks_for_an_upgrade(saved, tmp_path):
    path = tmp_path / "future.lmm"

    def change(name, b):
        if name != "lmmarg_fit.json":
            return b
        m = json.loads(b)
        m["format_version"] = FORMAT_VERSION + 1
        return json.dumps(m).encode()

    _rewrite(saved, path, change)
    with pytest.raises(SavedFitError, match=f"format version {FORMAT_VERSION + 1}.*upgrade lmmarg"):
        lmmarg.load(path)
