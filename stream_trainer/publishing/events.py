"""Whether a version becomes champion, and its event on Kafka (when to publish one:
:mod:`stream_trainer.operations.cadence`).

Version event (the value; the key is the model name), canonical JSON::

    {"artifact_uri": "file:///.../model.pkl", "champion": true, "metadata": {...},
     "model_name": "m", "type": "version", "version": 7}

A champion change made later by hand (``versions promote`` / ``rollback``) is a
``"type": "champion"`` event with the same fields plus ``reason``; readers follow the
``champion`` flag of version events only forward (a late repeat of an old version's event
never moves a reader back), and champion events always.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from stream_trainer.config import GateSettings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.registry import Registry, VersionInfo, atomic_write, sent_marker


class VersionEventError(StreamTrainerError):
    """A version event was not delivered (the caller retries; the marker is not written)."""


# Probabilistic metrics cannot be recomputed from the stored predictions the publish path
# judges the candidate by, so the gate prefers a metric that can be scored on both paths.
_PROBABILISTIC = frozenset({"log_loss", "roc_auc"})

# Verdict.code values: a small fixed set, safe as a metric label or a log field to group by.
GATE_CODES = frozenset(
    {
        "candidate_not_finite",
        "disabled",
        "nothing_to_compare",
        "candidate_undefined",
        "champion_undefined",
        "within_margin",
        "worse_than_margin",
    }
)


def gate_metric(metrics: Sequence[str]) -> str:
    """The metric both gate paths compare on: the first of ``metrics`` (the configured
    ``evaluation.metrics`` or the task's defaults) that is not probabilistic (``log_loss``,
    ``roc_auc``), else the first. Its direction comes from ``PrequentialEvaluator.score``:
    scores are oriented higher-is-better (mae, rmse, log_loss are negated)."""
    if not metrics:
        raise ValueError("the gate needs at least one metric")
    return next((m for m in metrics if m not in _PROBABILISTIC), metrics[0])


class Verdict(NamedTuple):
    """A gate decision: ``code`` is one of :data:`GATE_CODES`; ``reason`` is the readable
    explanation with the scores (for logs, the decision log and control acks)."""

    accepted: bool
    code: str
    reason: str


def _undefined(score: float | None) -> bool:
    return score is None or math.isnan(score)


def _fmt(score: float | None) -> str:
    return "none" if score is None else f"{score:.6g}"


def judge(
    settings: GateSettings,
    champion_score: float | None,
    candidate_score: float | None,
    candidate_finite: bool = True,
) -> Verdict:
    """The one promotion rule, for periodic publishes and full retrains alike.

    Scores are higher-is-better (losses negated); None or NaN means undefined (no champion,
    no records to score on, a metric undefined on them). In order:

    1. candidate parameters not finite: reject, even with the gate disabled;
    2. gate disabled: accept;
    3. candidate and champion both undefined (includes: no champion yet and nothing to
       score on): accept, there is nothing to compare on;
    4. candidate undefined, champion defined: reject;
    5. champion undefined (no champion yet, or its score is NaN): accept;
    6. accept iff ``candidate >= champion - margin`` (infinities compare as numbers).
    """
    scores = f"candidate {_fmt(candidate_score)} vs champion {_fmt(champion_score)}"
    if not candidate_finite:
        return Verdict(False, "candidate_not_finite", "candidate has non-finite parameters")
    if not settings.enabled:
        return Verdict(True, "disabled", f"gate disabled ({scores})")
    if _undefined(candidate_score) and _undefined(champion_score):
        return Verdict(True, "nothing_to_compare", f"no scores to compare on ({scores})")
    if candidate_score is None or math.isnan(candidate_score):
        return Verdict(False, "candidate_undefined", f"candidate has no score ({scores})")
    if champion_score is None or math.isnan(champion_score):
        return Verdict(True, "champion_undefined", f"champion has no score ({scores})")
    margin = settings.margin
    if candidate_score >= champion_score - margin:
        return Verdict(True, "within_margin", f"{scores}: >= champion - margin {margin:g}")
    return Verdict(False, "worse_than_margin", f"{scores}: < champion - margin {margin:g}")


class PromotionGate:
    """Champion / challenger on ``registry.gate``: see :func:`judge` for the rule."""

    def __init__(self, settings: GateSettings) -> None:
        self._settings = settings

    def decide(
        self,
        champion_score: float | None,
        candidate_score: float | None,
        candidate_finite: bool = True,
    ) -> Verdict:
        """:func:`judge` with this gate's settings."""
        return judge(self._settings, champion_score, candidate_score, candidate_finite)


def canonical_event(event: dict[str, Any]) -> bytes:
    """``event`` as canonical JSON (sorted keys, no spaces, no NaN): the same event always
    gives the same bytes, so a repeat after a crash is byte-identical."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def version_event(metadata: dict[str, Any], artifact_uri: str) -> bytes:
    """The event value for a version: canonical JSON, so the same inputs always give the
    same bytes (repeats after a crash are byte-identical)."""
    return canonical_event(
        {
            "type": "version",
            "model_name": metadata["model_name"],
            "version": metadata["version"],
            "champion": bool(metadata.get("champion", False)),
            "artifact_uri": artifact_uri,
            "metadata": metadata,
        }
    )


def champion_event(info: VersionInfo, reason: str) -> bytes:
    """The event value for a manual promote / rollback to ``info``."""
    return canonical_event(
        {
            "type": "champion",
            "model_name": info.metadata["model_name"],
            "version": info.version,
            "champion": True,
            "reason": reason,
            "artifact_uri": info.artifact_uri,
            "metadata": info.metadata,
        }
    )


class VersionEventPublisher:
    """Sends version events keyed by model name and remembers which were delivered.

    ``producer`` must be idempotent (``KafkaSettings.producer_config()`` sets
    ``enable.idempotence`` and ``acks=all``). Delivery is at least once: the sent-marker is
    written only after the broker acknowledged, so a crash in between re-sends the same
    bytes on the next :meth:`republish_pending`.
    """

    def __init__(self, producer: Any, topic: str, model_name: str, timeout_s: float = 30.0) -> None:
        self._producer = producer
        self._topic = topic
        self._model_name = model_name
        self._timeout_s = timeout_s

    # The three below are what a scoped model's events change
    # (stream_trainer.publishing.scoped_publish.ScopedEventPublisher); delivery and markers stay
    # here.

    def event_key(self) -> bytes:
        """The Kafka message key of this publisher's events: the model name."""
        return self._model_name.encode()

    def version_value(self, info: VersionInfo) -> bytes:
        """The event value announcing ``info`` (:func:`version_event`)."""
        return version_event(info.metadata, info.artifact_uri)

    def champion_value(self, info: VersionInfo, reason: str) -> bytes:
        """The event value of a manual promote / rollback (:func:`champion_event`)."""
        return champion_event(info, reason)

    def _send(self, value: bytes) -> None:
        outcome: dict[str, Any] = {}

        def on_delivery(error: Any, _message: Any) -> None:
            outcome["error"] = error

        self._producer.produce(
            self._topic, key=self.event_key(), value=value, on_delivery=on_delivery
        )
        remaining = self._producer.flush(self._timeout_s)
        if "error" not in outcome:
            raise VersionEventError(
                f"version event to {self._topic} not delivered within {self._timeout_s}s "
                f"({remaining} message(s) still queued)"
            )
        if outcome["error"] is not None:
            raise VersionEventError(f"version event to {self._topic}: {outcome['error']}")

    def publish(self, info: VersionInfo, registry: Registry | None = None) -> None:
        """Send the event of ``info``, wait for delivery, then mark it sent in ``registry``
        (without one: the marker beside a local registry's version folder).

        Raises VersionEventError when not delivered (nothing is marked)."""
        self._send(self.version_value(info))
        if registry is not None:
            registry.mark_event_sent(info)
            return
        marker = sent_marker(info)
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, b"")

    def publish_champion(self, info: VersionInfo, reason: str) -> None:
        """Announce a manual promote / rollback to ``info`` (after the registry changed)."""
        self._send(self.champion_value(info, reason))

    def republish_pending(self, registry: Registry) -> list[int]:
        """On start: finish an interrupted promotion (:meth:`ModelRegistry.recover`), then
        send the event of every existing version without a sent-marker, oldest first;
        returns their numbers. Only versions on disk get events."""
        registry.recover()
        sent = []
        for info in registry.list():
            if not registry.event_sent(info):
                self.publish(info, registry)
                sent.append(info.version)
        return sent
