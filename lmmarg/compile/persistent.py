"""JAX's persistent compilation cache, on by default in a per-user directory (docs/guide.md, "Compilation cache").

Compiling the NUTS program of a model takes seconds; with the cache a new process that fits the same model (same
shapes, same options) loads the compiled program from disk instead. lmmarg switches the cache on the first time
``sample()`` or ``fit_ml()`` runs, in ``default_cache_dir()`` (``~/.cache/lmmarg/jax`` on Linux), unless

* the user configured JAX's cache already (``jax.config.jax_compilation_cache_dir`` or the environment variable
  ``JAX_COMPILATION_CACHE_DIR``): that cache is used as it is and never changed;
* the environment variable ``LMMARG_JAX_CACHE`` is ``0`` / ``false`` / ``off`` / ``no`` (off), or a directory to use;
* ``sample(compilation_cache=False)`` or ``set_compilation_cache(False)`` turned it off.

A directory that cannot be created or written (read-only HOME, ...) leaves the cache off, with a debug log note.
When lmmarg opens its cache it deletes the oldest entries beyond ``MAX_BYTES`` (JAX itself only evicts with the
optional ``filelock`` package installed).

>>> import lmmarg.compile
>>> lmmarg.compile.set_compilation_cache(False)   # off for this process (lmmarg's cache only)
>>> lmmarg.compile.set_compilation_cache(True)    # back on, default directory (or LMMARG_JAX_CACHE's path)

Internal API (documented for tests): ``state`` (the directory lmmarg set and whether the default was applied),
``trim(path, max_bytes)`` and ``reset_jax_cache()``.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

import jax

__all__ = ["default_cache_dir", "set_compilation_cache", "active_cache_dir", "apply", "MAX_BYTES", "state", "trim",
           "reset_jax_cache"]

logger = logging.getLogger(__name__)

_OFF = ("0", "false", "off", "no", "none")
# programs cheaper to compile than this are not written (JAX's default, 1 s, would skip most of lmmarg's init,
# constrain and recovery programs, which compile in less; docs/benchmarks.md, 'Measurements behind the code')
_MIN_COMPILE_SECS = 0.1

MAX_BYTES = 2 << 30  # lmmarg's cache is trimmed to this size (oldest entries first) when it is opened
state = {"ours": None, "decided": False}  # the directory lmmarg set (None: not ours), default applied once


def default_cache_dir() -> str | None:
    """The per-user cache directory: $XDG_CACHE_HOME/lmmarg/jax (default ~/.cache/lmmarg/jax) on Linux,
    ~/Library/Caches/lmmarg/jax on macOS, %LOCALAPPDATA%\\lmmarg\\jax on Windows; None without a home directory."""
    if os.path.expanduser("~") == "~" and not os.environ.get("XDG_CACHE_HOME" if sys.platform != "win32"
                                                                 else "LOCALAPPDATA"):
        return None
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    elif sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lmmarg", "jax")


def _user_configured() -> bool:
    """A cache configured by the user (not by lmmarg): JAX's config option or its environment variable."""
    cur = jax.config.jax_compilation_cache_dir
    return (bool(os.environ.get("JAX_COMPILATION_CACHE_DIR")) or (cur is not None and cur != state["ours"])
            or not jax.config.jax_enable_compilation_cache)  # the user switched JAX's cache off


def trim(path: str, max_bytes: int = MAX_BYTES) -> None:
    """Delete the oldest files of the cache directory until it holds at most max_bytes."""
    try:
        files = [e for e in os.scandir(path) if e.is_file(follow_symlinks=False)]
        stats = sorted(((e.stat().st_mtime, e.stat().st_size, e.path) for e in files))
        total = sum(st[1] for st in stats)
        for _, size, f in stats:
            if total <= max_bytes:
                break
            os.remove(f)
            total -= size
    except OSError as e:  # another process trimming at the same time, ...
        logger.debug("lmmarg: compilation cache not trimmed (%s)", e)


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lmmarg-probe-"):
            pass
        return True
    except OSError as e:  # read-only HOME, a file in the way, no permission, ...
        logger.debug("lmmarg: compilation cache off, %s is not writable (%s)", path, e)
        return False


def reset_jax_cache() -> None:
    """Make JAX re-read the cache directory at its next compilation (it initializes its cache object once)."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    cc.reset_cache()


def _switch_off() -> None:
    if state["ours"] is not None and jax.config.jax_compilation_cache_dir == state["ours"]:
        jax.config.update("jax_compilation_cache_dir", None)
        reset_jax_cache()
    state["ours"] = None


def set_compilation_cache(enable: bool | str = True) -> str | None:
    """Switch lmmarg's persistent compilation cache on (True: ``LMMARG_JAX_CACHE``'s directory or the default;
    a string: that directory) or off (False). A cache the user configured for JAX is never changed.

    Returns the directory JAX caches compilations in afterwards (the user's, lmmarg's, or None when off).
    """
    if not (enable is None or isinstance(enable, (bool, str, os.PathLike))):
        raise TypeError(f"compilation_cache must be True, False, None or a directory, got {enable!r}")
    state["decided"] = True
    if _user_configured():
        return active_cache_dir()
    if enable is False or enable is None:
        _switch_off()
        return None
    if enable is True:
        env = os.environ.get("LMMARG_JAX_CACHE", "").strip()
        path = env if env and env.lower() not in _OFF + ("1", "true", "on", "yes") else default_cache_dir()
    else:
        path = os.fspath(enable)
    if path is None:
        logger.debug("lmmarg: compilation cache off, no home directory")
        _switch_off()
        return None
    path = os.path.abspath(os.path.expanduser(path))
    if path == state["ours"]:
        return path
    if not _writable(path):
        _switch_off()
        return None
    trim(path)
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default, i.e. not set by the user
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECS)
    reset_jax_cache()
    state["ours"] = path
    return path


def active_cache_dir() -> str | None:
    """The directory JAX's persistent cache uses now (whoever configured it), or None."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or None


def apply(compilation_cache: bool | str | None = None) -> str | None:
    """What ``sample()`` calls first: None applies the default (``LMMARG_JAX_CACHE``, else on) once per process;
    True / False / a directory as in ``set_compilation_cache``. Raises only for an argument of the wrong type:
    otherwise a cache that cannot be set up is left off (the cache is an optimization)."""
    if not (compilation_cache is None or isinstance(compilation_cache, (bool, str, os.PathLike))):
        raise TypeError(f"compilation_cache must be True, False, None or a directory, got {compilation_cache!r}")
    try:
        if compilation_cache is None:
            if state["decided"]:
                return active_cache_dir()
            env = os.environ.get("LMMARG_JAX_CACHE", "").strip().lower()
            return set_compilation_cache(env not in _OFF)
        return set_compilation_cache(compilation_cache)
    except Exception as e:  # noqa: BLE001 - a broken cache setup must not break a fit
        logger.debug("lmmarg: compilation cache not set up (%r)", e)
        return None
