"""Saved fits: one file that is written atomically, verified by checksums and read without running code.

``Fit.save(path)`` writes a zip file (stdlib ``zipfile``) with these members:

* ``lmmarg_fit.json`` — the manifest: format name ``"lmmarg-fit"``, ``format_version``, the lmmarg version that
  wrote it, and the SHA-256 and size of every other member (with what it holds, e.g. ``samples['u_Subject']``);
* ``meta.json`` — everything that is not an array, as JSON: the model's formula and options (family, link, trials,
  dtype, sigma_by or sigma formula, dense_limit), its prior table (each distribution as its NumPyro class name and
  parameters), the data frame's columns (name, dtype, categories), and the fit's attributes (method, diagnostics,
  ...) with arrays replaced by references to members;
* ``arrays/<i>.npy`` — NumPy arrays (draws, sample statistics, data columns), read with ``allow_pickle=False``;
* ``pickled.pkl`` — only when something cannot be stored as data (a prior of a user-defined distribution class, a
  data column of arbitrary Python objects, ...): those items, pickled. ``load`` refuses such a file unless
  ``allow_pickle=True`` is passed, because unpickling runs code stored in the file; ``save`` warns when it writes one.

Writing goes to a temporary file in the target's directory (flushed and fsynced) that replaces the target with
``os.replace`` only when complete: a failed or interrupted save leaves the earlier file as it was and no temporary
file behind. ``load`` checks the manifest, the format version and every checksum before it decodes anything, then
rebuilds the Model from formula + data + options (``Model(...)``, so compiled kernels come back on demand), restores
the prior table, and rebuilds the Fit. Files written by lmmarg 0.1 (a pickled Fit) load with ``allow_pickle=True``.
The Model and Fit classes are the caller's (``lmmarg.load``, ``load_fit(..., model_class=, fit_class=)``): this
module sits below both (``Fit.save`` calls it), so it imports neither.

Not saved: the NumPyro potential and compiled caches (rebuilt on demand, as when pickling) and the guide object of a
VI fit (``fit.guide`` is None after loading: it is bound to the model's code; ``fit.params`` keeps its fitted
parameters).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import os
import pickle
import secrets
import stat
import warnings
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd

from . import __version__ as LMMARG_VERSION
from ._warnings import warn_user
from .priors import LKJ, Prior
from .sufficient import SufficientStatistics

__all__ = ["FORMAT", "FORMAT_VERSION", "SavedFitError", "DamagedFileError", "NotAFitError", "SaveError",
           "save_fit", "load_fit"]

FORMAT = "lmmarg-fit"
FORMAT_VERSION = 1
MANIFEST = "lmmarg_fit.json"
META = "meta.json"
PICKLED = "pickled.pkl"
_ZIP_MAGIC = b"PK\x03\x04"

# Model attributes that Model(formula, data, **options) rebuilds; any others are saved as they are
_MODEL_REBUILT = {"design", "statistics", "dtype", "dense_limit", "family_spec", "family", "link", "y", "trials",
                  "trials_column", "log_jacobian", "sigma_spec", "_priors", "cache", "_plans", "_jitted", "_potentials"}
# Fit attributes not saved (value None after loading): compiled code bound to the model, rebuilt on demand
_FIT_NOT_SAVED = ("potential", "guide")


class SavedFitError(ValueError):
    """A file that ``lmmarg.load`` cannot turn into a fit (newer format, refused pickle, not rebuildable)."""


class DamagedFileError(SavedFitError):
    """The file is damaged or truncated: a checksum does not match, or its structure cannot be read."""


class NotAFitError(SavedFitError, TypeError):
    """The file is not an lmmarg fit (or is a pickle and ``allow_pickle`` is False)."""


class SaveError(OSError):
    """``Fit.save`` could not write the file; the earlier file at the path (if any) is unchanged."""


class _Unrepresentable(Exception):
    """Raised inside the encoder for a value that has no data form (it then goes to the pickled member)."""


# ---------------------------------------------------------------------------------------------------------------
# encoding: Python values -> JSON-able values + arrays (+ pickled leftovers)

_JSON_SCALARS = (type(None), bool, int, float, str)
_ARRAY_KINDS = "biufcmMUS"  # dtypes np.save writes without pickle (no object or structured dtypes)


def _dist_class(name: str):
    """The NumPyro distribution class of that name, or None (only numpyro.distributions' own classes)."""
    cls = getattr(dist, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, dist.Distribution) else None


def _init_params(cls) -> list[str]:
    """Constructor parameters of a distribution class (without validate_args)."""
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "validate_args") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _same(a, b) -> bool:
    """Exact equality of two decoded values (types, dtypes and values; NaN equals NaN)."""
    if isinstance(a, dist.Distribution) or isinstance(b, dist.Distribution):
        return (type(a) is type(b) and
                all(_same(getattr(a, n, None), getattr(b, n, None)) for n in _init_params(type(a))))
    if isinstance(a, (np.ndarray, np.generic, jax.Array)) or isinstance(b, (np.ndarray, np.generic, jax.Array)):
        if type(a) is not type(b):
            return False
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return type(a) is type(b)
    return type(a) is type(b) and a == b


class _Encoder:
    """Turns Python values into JSON-able values; arrays become members ``arrays/<i>.npy`` referenced as
    {"__array__": name}. A value with no data form is kept for the pickled member ({"__pickled__": i})."""

    def __init__(self):
        self.arrays: dict[str, tuple[np.ndarray, str]] = {}  # member name -> (array, what it is)
        self.pickled: list = []
        self.pickled_what: list[str] = []

    def array(self, a: np.ndarray, what: str) -> dict:
        name = f"arrays/{len(self.arrays)}.npy"
        self.arrays[name] = (a, what)
        return {"__array__": name}

    def keep_pickled(self, v, what: str) -> dict:
        self.pickled.append(v)
        self.pickled_what.append(f"{what} ({type(v).__module__}.{type(v).__qualname__})")
        return {"__pickled__": len(self.pickled) - 1, "what": what}

    def value(self, v, what: str):
        try:
            return self._value(v, what)
        except _Unrepresentable:
            return self.keep_pickled(v, what)

    def _value(self, v, what: str):
        if type(v) in _JSON_SCALARS:  # exact types: an IntEnum or a str subclass would not come back as itself
            return v
        if isinstance(v, np.generic) and v.dtype.kind in "biufU":
            return {"__npscalar__": v.dtype.str, "value": v.item()}
        if isinstance(v, np.generic) and v.dtype.kind in _ARRAY_KINDS:
            return {**self.array(np.asarray(v), what), "scalar": True}
        if isinstance(v, jax.Array):
            return {**self.array(np.asarray(v), what), "jax": True}
        if type(v) is np.ndarray and v.dtype.kind in _ARRAY_KINDS:
            return self.array(v, what)
        if type(v) is list:
            return [self.value(x, f"{what}[{i}]") for i, x in enumerate(v)]
        if type(v) is tuple:
            return {"__tuple__": [self.value(x, f"{what}[{i}]") for i, x in enumerate(v)]}
        if type(v) is dict:
            if all(type(k) is str for k in v):
                return {"__dict__": {k: self.value(x, f"{what}[{k!r}]") for k, x in v.items()}}
            return {"__items__": [[self._value(k, f"{what} key"), self.value(x, f"{what}[{k!r}]")]
                                  for k, x in v.items()]}
        if type(v) is LKJ:
            return {"__lkj__": self._value(v.eta, f"{what}.eta")}
        if isinstance(v, dist.Distribution):
            return self._dist(v, what)
        raise _Unrepresentable

    def _dist(self, d, what: str) -> dict:
        """A NumPyro distribution as its class name and constructor arguments; checked by rebuilding it."""
        cls = type(d)
        if _dist_class(cls.__name__) is not cls:
            raise _Unrepresentable  # a user-defined class: no data form
        params = {}
        for n in _init_params(cls):
            if not hasattr(d, n):
                raise _Unrepresentable
            params[n] = self._value(getattr(d, n), f"{what}.{n}")
        out = {"__dist__": cls.__name__, "params": params}
        try:
            same = _same(_Decoder(lambda name: self.arrays[name][0], []).value(out), d)
        except Exception:  # a constructor that does not take its own attributes back (e.g. probs and logits)
            same = False
        if not same:
            raise _Unrepresentable
        return out

    # -- data frame --------------------------------------------------------------------------------------------
    def frame(self, df: pd.DataFrame, what: str) -> dict:
        """A data frame as columns: numeric / datetime arrays, categoricals (codes + categories), other columns
        as JSON values with their dtype name. Each column is checked by decoding it; a column that does not come
        back identical is kept for the pickled member."""
        index = df.index
        if not (isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1) \
                or not df.columns.is_unique or not all(type(c) is str for c in df.columns):
            return self.keep_pickled(df, what)
        cols = []
        for name in df.columns:
            col_what = f"{what} column {name!r}"
            n_arrays = len(self.arrays)
            try:
                enc = self._column(df[name], col_what)
                back = _Decoder(lambda m: self.arrays[m][0], []).column(enc, len(df))
                if not _same_series(back, df[name]):
                    raise _Unrepresentable
            except Exception:  # a column that does not come back identical, for whatever reason, is pickled
                for m in list(self.arrays)[n_arrays:]:
                    del self.arrays[m]
                enc = {"kind": "pickled", "values": self.keep_pickled(df[name], col_what)}
            cols.append({"name": name, **enc})
        return {"__frame__": cols, "n_rows": len(df)}

    def _column(self, s: pd.Series, what: str) -> dict:
        dtype = s.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cats = pd.Series(dtype.categories)
            return {"kind": "categorical", "codes": self.array(np.asarray(s.cat.codes), f"{what} codes"),
                    "ordered": bool(dtype.ordered), "categories": self._column(cats, f"{what} categories"),
                    "n_categories": len(cats)}
        if isinstance(dtype, np.dtype) and dtype.kind in _ARRAY_KINDS:
            return {"kind": "array", "values": self.array(s.to_numpy(), what)}
        name = str(dtype)
        try:
            if pd.api.types.pandas_dtype(name) != dtype:
                raise _Unrepresentable
        except (TypeError, ValueError):
            raise _Unrepresentable from None
        return {"kind": "values", "dtype": name, "values": [_element(v) for v in s.tolist()]}


def _element(v):
    """One element of an object / extension-dtype column as JSON (str, number, bool, None, NaN, pd.NA)."""
    if type(v) in _JSON_SCALARS:
        return v
    if v is pd.NA:
        return {"__na__": True}
    if isinstance(v, np.generic) and v.dtype.kind in "biufU":
        return {"__npscalar__": v.dtype.str, "value": v.item()}
    raise _Unrepresentable


def _same_series(a: pd.Series, b: pd.Series) -> bool:
    if a.dtype != b.dtype or len(a) != len(b) or not a.equals(b):
        return False
    if isinstance(a.dtype, pd.CategoricalDtype):
        return _same_series(pd.Series(a.cat.categories), pd.Series(b.cat.categories))
    if a.dtype == object:  # equals() takes 1 == 1.0 == True: compare the element types too
        return [type(x) for x in a.tolist()] == [type(x) for x in b.tolist()]
    return True


# ---------------------------------------------------------------------------------------------------------------
# decoding: JSON-able values + arrays -> Python values


class _Decoder:
    """Inverse of _Encoder. ``array(name)`` returns a member's array; ``pickled`` the unpickled leftovers."""

    def __init__(self, array, pickled: list):
        self.array, self.pickled = array, pickled

    def value(self, v):
        if type(v) is list:
            return [self.value(x) for x in v]
        if type(v) is not dict:
            return v
        if "__array__" in v:
            a = self.array(v["__array__"])
            if v.get("jax"):
                return jnp.asarray(a)
            return a[()] if v.get("scalar") else a
        if "__npscalar__" in v:
            return np.dtype(v["__npscalar__"]).type(v["value"])
        if "__tuple__" in v:
            return tuple(self.value(x) for x in v["__tuple__"])
        if "__dict__" in v:
            return {k: self.value(x) for k, x in v["__dict__"].items()}
        if "__items__" in v:
            return {self.value(k): self.value(x) for k, x in v["__items__"]}
        if "__lkj__" in v:
            return LKJ(self.value(v["__lkj__"]))
        if "__dist__" in v:
            cls = _dist_class(v["__dist__"])
            if cls is None:
                raise SavedFitError(f"unknown distribution class {v['__dist__']!r} (not in numpyro.distributions)")
            return cls(**{k: self.value(x) for k, x in v["params"].items()})
        if "__pickled__" in v:
            return self.pickled[v["__pickled__"]]
        if "__frame__" in v:
            n = v["n_rows"]
            return pd.DataFrame({c["name"]: self.column(c, n) for c in v["__frame__"]}, index=pd.RangeIndex(n))
        raise SavedFitError(f"unknown entry {sorted(v)[:3]} in the file's metadata")

    def column(self, c: dict, n: int | None) -> pd.Series:
        kind = c["kind"]
        if kind == "array":
            s = pd.Series(self.value(c["values"]), copy=False)
        elif kind == "categorical":
            cats = pd.Index(self.column(c["categories"], c["n_categories"]))
            s = pd.Series(pd.Categorical.from_codes(self.value(c["codes"]), categories=cats, ordered=c["ordered"]))
        elif kind == "values":
            vals = [pd.NA if type(x) is dict and x.get("__na__") else self.value(x) for x in c["values"]]
            s = pd.Series(vals, dtype=pd.api.types.pandas_dtype(c["dtype"]))
        elif kind == "pickled":
            s = self.value(c["values"])
        else:
            raise SavedFitError(f"unknown column kind {kind!r}")
        if n is not None and len(s) != n:
            raise SavedFitError(f"column {c.get('name')!r} has {len(s)} rows, the data {n}")
        return s.reset_index(drop=True) if kind == "pickled" else s


# ---------------------------------------------------------------------------------------------------------------
# fit <-> metadata


def _model_meta(model, enc: _Encoder) -> dict:
    ss = model.sigma_spec
    state = model.__getstate__()
    extra = {k: v for k, v in state.items() if k not in _MODEL_REBUILT}
    priors = [{f.name: enc.value(getattr(p, f.name), f"prior {p.site!r} {f.name}")
               for f in dataclasses.fields(Prior)} for p in model.priors]
    return {"formula": model.formula, "family": model.family, "link": model.link, "trials": model.trials_column,
            "dtype": np.dtype(model.dtype).name, "dense_limit": model.dense_limit,
            "sigma_by": ss.by if ss.kind == "by" else None, "sigma": ss.formula if ss.kind == "formula" else None,
            # a model from sufficient statistics keeps them (the .npz bytes) in place of the rows
            "data": None if model.statistics is not None else enc.frame(model.design.data, "the data"),
            "statistics": (None if model.statistics is None else
                           enc.value(np.frombuffer(model.statistics.to_bytes(), np.uint8), "the statistics")),
            "priors": priors,
            "check": {"n_obs": model.n_obs, "fixed_names": list(model.fixed_names),
                      "terms": [[t.name, int(t.n_groups)] for t in model.terms]},
            "extra": enc.value(extra, "model attribute")}


def _fit_meta(fit, enc: _Encoder) -> dict:
    state = fit.__getstate__()
    state.pop("model")
    not_saved = {k: type(state.pop(k)).__name__ for k in _FIT_NOT_SAVED if k in state}  # name: type dropped
    return {"class": f"{type(fit).__module__}.{type(fit).__qualname__}", "not_saved": not_saved,
            "state": {k: enc.value(v, k if k in ("samples", "sample_stats", "diagnostics") else f"fit.{k}")
                      for k, v in state.items()}}


def _rebuild_model(meta: dict, dec: _Decoder, path: str, model_class):
    if meta.get("statistics") is not None:
        data = SufficientStatistics.from_bytes(np.asarray(dec.value(meta["statistics"]), np.uint8).tobytes())
    else:
        data = dec.value(meta["data"])
    try:
        with warnings.catch_warnings():  # the data's warnings were given when the model was first built
            warnings.simplefilter("ignore")
            model = model_class(meta["formula"], data, family=meta["family"], link=meta["link"], trials=meta["trials"],
                          dtype=meta["dtype"], sigma_by=meta["sigma_by"], sigma=meta["sigma"],
                          dense_limit=meta["dense_limit"])
    except Exception as exc:
        raise SavedFitError(f"{path}: the model could not be rebuilt from its saved formula {meta['formula']!r} "
                            f"and data ({type(exc).__name__}: {exc})") from exc
    check = {"n_obs": model.n_obs, "fixed_names": list(model.fixed_names),
             "terms": [[t.name, int(t.n_groups)] for t in model.terms]}
    if check != meta["check"]:
        raise SavedFitError(f"{path}: the model rebuilt from the saved formula and data differs from the saved one "
                            f"({check} != {meta['check']}); was it written by another lmmarg or pandas version?")
    saved = {p["site"]: p for p in meta["priors"]}
    if set(saved) != {p.site for p in model.priors}:
        raise SavedFitError(f"{path}: the saved priors {sorted(saved)} do not match the rebuilt model's parameters "
                            f"{sorted(p.site for p in model.priors)}")
    for site, fields in saved.items():  # exactly the saved table, user priors and edits included
        p = model.priors[site]
        for name, v in fields.items():
            setattr(p, name, dec.value(v))
    for k, v in dec.value(meta["extra"]).items():
        setattr(model, k, v)
    return model


# ---------------------------------------------------------------------------------------------------------------
# writing


class _HashingWriter:
    """A write-only stream that passes bytes on and keeps their SHA-256 and count."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.raw.write(b)


def _write_zip(fh, meta_bytes: bytes, enc: _Encoder, pickled_bytes: bytes | None) -> None:
    members = {}
    with zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
        for name, (a, what) in enc.arrays.items():
            with zf.open(name, "w", force_zip64=a.nbytes > 2**30) as m:
                w = _HashingWriter(m)
                np.lib.format.write_array(w, a, allow_pickle=False)
            members[name] = {"sha256": w.sha.hexdigest(), "size": w.size, "what": what}
        blobs = [(META, meta_bytes, "the metadata")]
        if pickled_bytes is not None:
            blobs.append((PICKLED, pickled_bytes, "the pickled items"))
        for name, b, what in blobs:
            zf.writestr(name, b, compress_type=zipfile.ZIP_DEFLATED)
            members[name] = {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "what": what}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "lmmarg_version": LMMARG_VERSION,
                    "numpy_version": np.__version__, "pandas_version": pd.__version__,
                    "pickled": enc.pickled_what, "members": members}
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1).encode(), compress_type=zipfile.ZIP_DEFLATED)


def save_fit(fit, path) -> None:
    """Write ``fit`` to ``path`` atomically (see the module docstring for the format).

    Raises SaveError (an OSError) when the file cannot be written, the earlier file at ``path`` left unchanged and
    no temporary file left behind; an interrupt (KeyboardInterrupt) does the same and propagates as it is."""
    path = os.fspath(path)
    target = os.path.realpath(path)  # a symbolic link is written through, as open(path, "wb") did
    enc = _Encoder()
    meta = {"model": _model_meta(fit.model, enc), "fit": _fit_meta(fit, enc)}
    meta_bytes = json.dumps(meta).encode()
    pickled_bytes = None
    if enc.pickled:
        try:
            pickled_bytes = pickle.dumps(enc.pickled, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SaveError(f"cannot save the fit to {path}: {'; '.join(enc.pickled_what)} cannot be stored as "
                            f"data, and pickling failed ({type(exc).__name__}: {exc}); nothing was written") from exc
        warn_user(f"Fit.save: {'; '.join(enc.pickled_what)} cannot be stored as data and was pickled into {path}; "
                  "lmmarg.load needs allow_pickle=True to read the file (unpickling runs code stored in it)")
    existed = os.path.exists(target)
    directory = os.path.dirname(target)  # the same file system as the target: os.replace is atomic there
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        # mode 0o666 minus the umask, as open(path, "wb") would create it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise SaveError(f"cannot save the fit to {path}: cannot create a temporary file in {directory} "
                        f"({exc}); {'the earlier file is unchanged' if existed else 'nothing was written'}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_zip(fh, meta_bytes, enc, pickled_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        if existed:
            with contextlib.suppress(OSError):
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: cleaned up, propagate as they are
            raise
        raise SaveError(f"saving the fit to {path} failed ({type(exc).__name__}: {exc}); "
                        f"{'the earlier file is unchanged' if existed else 'no file was written'} and the "
                        "temporary file was removed") from exc
    with contextlib.suppress(OSError, AttributeError):  # make the rename itself durable (POSIX)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# ---------------------------------------------------------------------------------------------------------------
# reading


def _damaged(path: str, what: str) -> DamagedFileError:
    return DamagedFileError(f"file {path} is damaged: {what}; it cannot be loaded (save the fit again, or restore "
                            "the file from a copy)")


def load_fit(path, allow_pickle: bool = False, *, model_class, fit_class):
    """Read a fit written by ``Fit.save(path)``: a ``fit_class`` (lmmarg.results.Fit) of a ``model_class``
    (lmmarg.Model) rebuilt from the saved formula, data and options.

    allow_pickle: also read what can only be stored with pickle (files written by lmmarg 0.1, and files whose
    ``save`` warned that it pickled something). Unpickling runs code stored in the file: pass True only for files
    you trust. Raises NotAFitError (a TypeError) for files that are not lmmarg fits, DamagedFileError for damaged or
    truncated files, SavedFitError for a newer format version or a refused pickle."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
        size = fh.seek(0, os.SEEK_END)
    if size == 0:
        raise DamagedFileError(f"file {path} is empty (0 bytes): it is not a saved fit, or its save was cut off")
    if head == _ZIP_MAGIC:
        return _load_zip(path, size, allow_pickle, model_class, fit_class)
    if head[:1] == b"\x80":  # pickle protocol 2 or later: Fit.save of lmmarg 0.1
        return _load_pickle(path, allow_pickle, fit_class)
    if _names_manifest(path):
        raise _damaged(path, f"its first bytes {head!r} are not the zip signature {_ZIP_MAGIC!r} of lmmarg's format")
    raise NotAFitError(f"{path} is not an lmmarg fit file: it starts with {head!r}, neither lmmarg's format "
                       f"({FORMAT!r}, a zip file) nor a pickle written by an older lmmarg")


def _names_manifest(path: str) -> bool:
    """Whether the file's bytes contain the manifest's member name (stored in clear in the zip headers): then it
    is a saved fit whose structure is damaged, not a foreign file."""
    with open(path, "rb") as fh:
        return MANIFEST.encode() in fh.read()


def _load_pickle(path: str, allow_pickle: bool, fit_class):
    if not allow_pickle:
        raise NotAFitError(f"{path} is a pickle file, not an lmmarg fit file in the data-only format "
                           f"(lmmarg 0.1 saved fits as pickles). Loading a pickle runs code stored in it: if you "
                           "trust the file, use lmmarg.load(path, allow_pickle=True), then save it again to convert it")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise _damaged(path, f"the pickle cannot be read, it is truncated or altered ({type(exc).__name__}: "
                             f"{exc})") from None
    if not isinstance(obj, fit_class):
        raise NotAFitError(f"{path} holds a {type(obj).__name__}, not an lmmarg fit")
    return obj


def _load_zip(path: str, size: int, allow_pickle: bool, model_class, fit_class):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError) as exc:
        raise DamagedFileError(f"file {path} is damaged or truncated ({size} bytes): its zip directory (at the end "
                               f"of the file) cannot be read ({exc}); the save was cut off or the file was "
                               "altered") from None
    with zf:
        names = zf.namelist()
        if MANIFEST not in names:
            if _names_manifest(path):
                raise _damaged(path, f"its zip directory lists no {MANIFEST!r} (members {names[:5]}"
                                     f"{' ...' if len(names) > 5 else ''}), though the file holds one")
            raise NotAFitError(f"{path} is not an lmmarg fit: a zip file without {MANIFEST!r} (members "
                               f"{names[:5]}{' ...' if len(names) > 5 else ''})")

        def read(name: str, what: str) -> bytes:
            try:
                return zf.read(name)
            except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error, NotImplementedError,
                    RuntimeError) as exc:  # altered header fields: unknown compression, "encrypted", ...
                if "CRC" in str(exc):  # the zip's own CRC-32 caught altered bytes before our SHA-256 could
                    raise _damaged(path, f"checksum mismatch in member {name!r} ({what}): its CRC-32 differs from "
                                         "the one recorded when it was saved") from None
                raise _damaged(path, f"member {name!r} ({what}) cannot be read ({exc})") from None

        try:
            manifest = json.loads(read(MANIFEST, "the manifest"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _damaged(path, f"its manifest is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise NotAFitError(f"{path} is not an lmmarg fit: its {MANIFEST!r} does not name the format {FORMAT!r}")
        version = manifest.get("format_version")
        if type(version) is not int or version < 1:
            raise _damaged(path, f"its format version {version!r} is not a positive integer")
        if version > FORMAT_VERSION:
            raise SavedFitError(f"{path} was written by lmmarg {manifest.get('lmmarg_version')} in format version "
                                f"{version}; this lmmarg ({LMMARG_VERSION}) reads format versions up to "
                                f"{FORMAT_VERSION}: upgrade lmmarg to load it")
        members = manifest.get("members")
        if not isinstance(members, dict):
            raise _damaged(path, "its manifest lists no members")
        listed, present = set(members), set(names) - {MANIFEST}
        if listed != present:
            raise _damaged(path, f"members missing {sorted(listed - present)[:5]}, unexpected "
                                 f"{sorted(present - listed)[:5]}")
        blobs = {}
        for name, info in members.items():
            what = info.get("what", name) if isinstance(info, dict) else name
            b = read(name, what)
            if not isinstance(info, dict) or len(b) != info.get("size") or \
                    hashlib.sha256(b).hexdigest() != info.get("sha256"):
                raise _damaged(path, f"checksum mismatch in member {name!r} ({what}): its SHA-256 differs from the "
                                     "one recorded when it was saved")
            blobs[name] = b
    if META not in blobs:
        raise _damaged(path, f"the member {META!r} is missing")

    pickled = []
    if manifest.get("pickled"):
        if not allow_pickle:
            raise SavedFitError(f"{path} holds item(s) that could only be saved with pickle: "
                                f"{'; '.join(manifest['pickled'])}. Unpickling runs code stored in the file: pass "
                                "allow_pickle=True to lmmarg.load only if you trust the file")
        if PICKLED not in blobs:
            raise _damaged(path, f"its manifest lists pickled items but the member {PICKLED!r} is missing")
        pickled = pickle.loads(blobs[PICKLED])

    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            if name not in blobs or name in (META, PICKLED):
                raise SavedFitError(f"{path}: the metadata refers to a missing array {name!r}")
            arrays[name] = np.lib.format.read_array(io.BytesIO(blobs[name]), allow_pickle=False)
        return arrays[name]

    dec = _Decoder(array, pickled)
    try:
        meta = json.loads(blobs[META])
        model = _rebuild_model(meta["model"], dec, path, model_class)
        state = {k: dec.value(v) for k, v in meta["fit"]["state"].items()}
        state.update({k: None for k in meta["fit"]["not_saved"]})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        if isinstance(exc, SavedFitError):
            raise
        raise SavedFitError(f"{path} is not a valid lmmarg fit: its metadata cannot be decoded "
                            f"({type(exc).__name__}: {exc})") from exc
    fit = fit_class.__new__(fit_class)
    fit.__setstate__({**state, "model": model})
    return fit

