"""What a crash must not lose: the training state, offsets, checkpoints, slots,
leases, object stores.

Imports nothing eagerly (docs/design/scale-out.md 9.1). Before this package existed,
``stream_trainer.state`` was the module of :class:`TrainingState`, and checkpoints
and artifacts pickled since name its classes by that path: they are resolved here
lazily, from :mod:`stream_trainer.state.training_state` (9.3)."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("stream_trainer.state.training_state")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
