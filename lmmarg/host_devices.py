"""CPU cores as XLA host devices, so that ``sample(chain_method="parallel")`` runs chains on every core.

XLA:CPU runs one program on one device, and one NUTS program for all chains in lockstep (``"vectorized"``) keeps a
single core busy. Made into several host devices (XLA's ``--xla_force_host_platform_device_count``), the cores run
one program each (``jax.pmap``), with the chains spread over them. The flag must be set before JAX starts its CPU
backend, so lmmarg sets it when it is imported, unless

* the environment variable ``LMMARG_HOST_DEVICES`` is ``0`` / ``off`` / ``false`` / ``no`` (leave XLA alone), or a
  number of devices to use instead of the number of cores;
* the user's ``XLA_FLAGS`` already say how many host devices to use: that is kept as it is;
* JAX's backends are already initialized (something computed with JAX before lmmarg was imported): then nothing
  can change, and ``chain_method="parallel"`` runs as ``"vectorized"`` on the one device.

Only the CPU platform is affected: on a GPU machine the GPUs are the devices. ``jax.devices("cpu")`` lists the
host devices; every computation that does not ask for another device still runs on the first one.
"""
from __future__ import annotations

import logging
import os

__all__ = ["configure", "requested_count"]

logger = logging.getLogger(__name__)

_FLAG = "--xla_force_host_platform_device_count"
_OFF = ("0", "off", "false", "no", "none")


def requested_count() -> int | None:
    """Host devices lmmarg asks for: LMMARG_HOST_DEVICES, or the cores available to this process; None: off."""
    env = os.environ.get("LMMARG_HOST_DEVICES", "").strip().lower()
    if env in _OFF:
        return None
    if env:
        try:
            n = int(env)
        except ValueError as e:
            raise ValueError(f"LMMARG_HOST_DEVICES must be a number of devices or 0/off, got {env!r}") from e
        return n if n > 1 else None
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return n if n > 1 else None


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - a JAX without this private helper: assume not started yet
        return False


def configure() -> bool:
    """Set the host device count in XLA_FLAGS (see the module docstring). Returns whether it was set."""
    n = requested_count()
    flags = os.environ.get("XLA_FLAGS", "")
    if n is None or _FLAG in flags:
        return False
    if _backends_initialized():
        logger.debug("lmmarg: JAX already started; host devices unchanged (chain_method='parallel' = vectorized)")
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
    return True
