"""The root of every exception stream-trainer defines.

``except StreamTrainerError`` catches any error of the service's own (configuration,
checkpoint, registry, lease, control, dead-letter, start-up…) and nothing else. Each
exception keeps its other bases (``IncompatibleLearner`` is still a ``ValueError``,
``WorkerDied`` a ``RuntimeError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class StreamTrainerError(Exception):
    """Base class of every exception stream-trainer defines."""
