"""Distributed engines behind one small interface: ``none``, ``horovod`` and ``tf``.

``get_engine(name)`` returns an uninitialised engine; call ``init()`` on it before TensorFlow
runs its first op. Asking for an engine whose runtime is not installed raises
:class:`~histoseg.errors.EngineUnavailableError` with what to do about it.
"""

from __future__ import annotations

import importlib

from histoseg.errors import ConfigError
from histoseg.train.engines.base import (
    COMPRESSIONS,
    DEFAULT_STEP_MODE,
    STEP_MODES,
    Engine,
    check_compression,
    check_step_mode,
    unwrap_variables,
)

ENGINE_NAMES = ("none", "horovod", "tf")


def get_engine(name: str) -> Engine:
    """The engine called ``name`` ("none", "horovod" or "tf"), not yet initialised.

    Raises:
        ConfigError: ``name`` is not an engine.
        EngineUnavailableError: the engine's runtime (e.g. Horovod) is not installed.
    """
    if name == "none":
        from histoseg.train.engines.none import NoneEngine

        return NoneEngine()
    if name == "horovod":
        from histoseg.train.engines.horovod import HorovodEngine

        return HorovodEngine()
    if name == "tf":
        from histoseg.train.engines.tf_distribute import TFDistributeEngine

        return TFDistributeEngine()
    raise ConfigError(f"engine {name!r} is not one of {', '.join(ENGINE_NAMES)}")


def horovod_available() -> bool:
    """True when ``import horovod.tensorflow`` works in this environment."""
    try:
        importlib.import_module("horovod.tensorflow")
    except ImportError:
        return False
    return True


__all__ = [
    "COMPRESSIONS",
    "DEFAULT_STEP_MODE",
    "ENGINE_NAMES",
    "STEP_MODES",
    "Engine",
    "check_compression",
    "check_step_mode",
    "get_engine",
    "horovod_available",
    "unwrap_variables",
]
