"""The training state: everything a checkpoint holds, pickled as one object.

Model, evaluator, drift detector, bad-record breaker, the full-batch window, the recent
records the promotion gate scores on, and the per-partition next offsets with the ledger
of processed offsets. Written together, restored together: that is what makes the effect
of every record on the model exactly once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_trainer.ingest.deadletter import BadRecordBreaker
from stream_trainer.state.ledger import OffsetLedger, TopicPartitionKey
from stream_trainer.training.evaluation import DriftMonitor, PrequentialEvaluator
from stream_trainer.training.learners import ModelAdapter

if TYPE_CHECKING:
    from stream_trainer.operations.control import Ack
    from stream_trainer.training.selection import OnlineSelection


class RecordWindow:
    """A bounded ring of the most recent records (features, labels, optional predictions).

    Appends are per batch and copy-free for the caller; ``arrays()`` returns them oldest
    first. Used as the full-batch training window and as the gate's recent data.
    """

    def __init__(self, capacity: int, n_features: int, label_dtype: Any) -> None:
        self.capacity = capacity
        self._X = np.empty((capacity, n_features), dtype=np.float64)
        self._y = np.empty(capacity, dtype=label_dtype)
        self._pred = np.empty(capacity, dtype=object)
        self._w = np.ones(capacity, dtype=np.float64)
        self._next = 0
        self.size = 0

    def extend(
        self,
        X: np.ndarray,
        y: np.ndarray,
        predictions: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        """Append rows; the oldest fall out once ``capacity`` is reached."""
        n = len(y)
        if n == 0:
            return
        if n >= self.capacity:
            X, y = X[-self.capacity :], y[-self.capacity :]
            predictions = None if predictions is None else predictions[-self.capacity :]
            weights = None if weights is None else weights[-self.capacity :]
            n = self.capacity
        positions = (np.arange(n) + self._next) % self.capacity
        self._X[positions] = X
        self._y[positions] = y
        self._pred[positions] = None if predictions is None else predictions
        self._w[positions] = 1.0 if weights is None else weights
        self._next = (self._next + n) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def clear(self) -> None:
        """Forget every row (capacity unchanged)."""
        self._next = 0
        self.size = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of ``(X, y, predictions, weights)``, oldest first."""
        if self.size < self.capacity:
            order = np.arange(self.size)
        else:
            order = (np.arange(self.capacity) + self._next) % self.capacity
        return self._X[order], self._y[order], self._pred[order], self._w[order]

    def __getstate__(self) -> dict[str, Any]:
        # The rows held, oldest first, not the preallocated buffers: a fresh gate window
        # of 1 000 rows pickled 60 kB of nothing per key model in key scope, and an empty
        # full-batch window of 100 000 rows tens of MB in a first checkpoint.
        X, y, predictions, weights = self.arrays()
        return {
            "capacity": self.capacity,
            "n_features": self._X.shape[1],
            "rows": (X, y, predictions, weights),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "rows" not in state:  # pickled whole, before rows-only pickling
            self.__dict__.update(state)
            return
        X, y, predictions, weights = state["rows"]
        self.__init__(state["capacity"], state["n_features"], y.dtype)  # type: ignore[misc]
        self.extend(X, y, predictions, weights)


@dataclass
class TrainingState:
    """The unit of checkpointing. Mutated only on the poll thread."""

    model: ModelAdapter
    evaluator: PrequentialEvaluator
    drift: DriftMonitor | None
    breaker: BadRecordBreaker
    recent: RecordWindow
    window: RecordWindow | None = None
    offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    ledger: OffsetLedger = field(default_factory=OffsetLedger)
    records_learnt: int = 0
    records_dead_lettered: int = 0
    drift_detections: int = 0
    model_version: int | None = None
    published_ledger: dict[str, list[list[int]]] = field(default_factory=dict)
    records_since_publish: int = 0
    drift_since_publish: int = 0
    records_since_retrain: int = 0
    retrain_wanted: str | None = None
    retrains: int = 0
    halted: dict[TopicPartitionKey, str] = field(default_factory=dict)
    # The trigger of the retrain in progress, until the gate has judged it: a retrain a
    # stop or crash abandoned runs again after the restart. Last, with a class default, so
    # checkpoints written before it existed still load.
    retrain_running: str | None = None
    # The id of this model's history: claimed on the lease topic, so no other model trains
    # on the group (see stream_trainer.state.kafka_lease).
    lineage: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Control-topic next offsets per partition, written with the effects of the commands
    # before them (a command is acted on once across restarts); None: never recorded (a
    # new model, or a checkpoint from before control offsets). Class defaults, so older
    # checkpoints still load.
    control_offsets: dict[int, int] | None = None
    # Set by `control pause`, cleared by `control resume`: a pause outlasts a restart.
    paused: bool = False
    # Acks of commands acted on, until delivered (a crash between the checkpoint and the
    # ack must not lose it: the command is not read again).
    acks_owed: list[Ack] | None = None
    # The last hyperparameter search (SearchSummary.as_dict plus the gate's verdict), kept
    # for the next search's warm start and `search show`; and the search that made the
    # current model (its version metadata). Plain data; class defaults for old checkpoints.
    last_search: dict[str, Any] | None = None
    model_search: dict[str, Any] | None = None
    # Online model selection (training.selection): every candidate with its scores and the
    # halving's progress; ``model`` is then its leader's model (one object, so pickle keeps
    # them one). None when selection is off, and in older checkpoints.
    selection: OnlineSelection | None = None

    def metrics_snapshot(self) -> dict[str, Any]:
        """Prequential metrics as JSON-able data (window and since start)."""
        return {
            "window": self.evaluator.window_values(),
            "total": self.evaluator.total_values(),
            "records": self.evaluator.count,
        }
