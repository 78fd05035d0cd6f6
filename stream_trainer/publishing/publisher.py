"""Turns the training state into model versions: policy, gate, registry, event.

Called on the poll thread right after a durable checkpoint, so a version never describes
state a crash could take back. The candidate is the current model; the champion is the
registry's. Both are scored on the same recent records, which neither had learnt when it
predicted them: the champion predicts them now, the candidate's prequential predictions
(made before it learnt each record) are reused.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_trainer import __version__
from stream_trainer.config import Settings
from stream_trainer.operations.cadence import Cadence
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.metrics import Metrics
from stream_trainer.publishing.events import (
    PromotionGate,
    VersionEventPublisher,
    gate_metric,
)
from stream_trainer.publishing.registry import (
    Registry,
    RegistryError,
    RegistryUnavailable,
    VersionInfo,
)
from stream_trainer.state.checkpoint import library_versions
from stream_trainer.state.training_state import TrainingState
from stream_trainer.training.evaluation import PrequentialEvaluator, evaluate_holdout
from stream_trainer.training.learners import ModelAdapter

if TYPE_CHECKING:
    from stream_trainer.training.trainers import RetrainOutcome

log = logging.getLogger(__name__)


class ModelPublisher:
    """Decides when to publish, gates the candidate, writes the version, sends its event."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        events: VersionEventPublisher | None,
        metrics: Metrics,
        crash: CrashPoints = NO_CRASHES,
        on_published: Callable[[], None] | None = None,
        stamp: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        """``on_published``: called after each published version (must not block: the
        MLflow exporter's ``notify``). ``stamp``: fields added to every version's and
        refusal's metadata, asked at each publish (a scoped slot's ``scope``,
        ``scope_id`` and current ``token``: :mod:`stream_trainer.publishing.scoped_publish`)."""
        cfg = settings.registry
        self._settings = settings
        self._registry = registry
        self._events = events
        self._metrics = metrics
        self._crash = crash
        self._on_published = on_published
        self._stamp = stamp
        # Counts records learnt; the count is persisted as state.records_since_publish.
        # The period starts at install (the service's clock), not here.
        self._cadence = Cadence(cfg.publish_every_records, cfg.publish_every_seconds)
        self._gate = PromotionGate(cfg.gate)
        self._metric = gate_metric(settings.evaluation_metrics())
        self._champion_cache: tuple[int, ModelAdapter] | None = None
        # Why the last publish() returned None: the gate's reason when it rejected the
        # candidate, else None (skipped: nothing new). Read by `control publish` acks.
        self.last_rejection: str | None = None

    # -- start-up ------------------------------------------------------------------------

    def reconcile(self, state: TrainingState) -> None:
        """After a restore: resend unsent events; adopt versions newer than the checkpoint.

        A crash after a version was published but before the next checkpoint leaves the
        registry ahead of the state: its lineage is taken from the registry so numbers and
        parent links stay right.
        """
        if self._events is not None:
            resent = self._events.republish_pending(self._registry)
            if resent:
                log.info("republished version events", extra={"versions": resent})
        versions = self._registry.list()
        if versions:
            latest = versions[-1]
            if state.model_version is None or latest.version > state.model_version:
                state.model_version = latest.version
                state.published_ledger = dict(latest.metadata.get("offsets_total", {}))
        champion = self._registry.champion()
        if champion is not None:
            learner = champion.metadata.get("learner", {}).get("path", "")
            self._metrics.set_model(champion.version, str(learner), self._settings.training.mode)

    # -- policy --------------------------------------------------------------------------

    def install(self, state: TrainingState, now: float) -> None:
        """Take ``state``'s count of records learnt since its last version; the period
        starts at ``now`` (a restored state does not publish the instant it lands)."""
        self._cadence.restart(state.records_since_publish, now)

    def observe(self, state: TrainingState, learnt: int) -> None:
        """Count ``learnt`` records toward the next version (persisted in ``state``)."""
        self._cadence.observe(learnt)
        state.records_since_publish = self._cadence.count

    def _restart(self, state: TrainingState, now: float) -> None:
        """A version was published, rejected or skipped at ``now``: the next counts anew."""
        self._cadence.reset(now)
        state.records_since_publish = 0

    def due(self, state: TrainingState, wanted: str | None, now: float) -> str | None:
        """The trigger of a publish that is due at ``now``: ``wanted`` (manual, retrain)
        first, then "records", then "time" (which needs at least one record learnt since
        the last version); None when not due or no model is fitted yet."""
        if wanted is not None:
            return wanted
        if not state.model.is_fitted():
            return None
        return self._cadence.trigger(now)

    # -- publish -------------------------------------------------------------------------

    def _champion(self) -> tuple[int, ModelAdapter] | None:
        """(version, model) the candidate is compared with, or None.

        The registry's champion when its artifact verifies (sha256 + HMAC). When it does
        not, or cannot be read, the champion is unavailable: counted, logged, and the newest
        earlier version that verifies stands in for it; with none, the candidate is judged
        without a champion. Training goes on either way.
        """
        info = self._registry.champion()
        if info is None:
            return None
        cached = self._champion_cache
        if cached is not None and cached[0] == info.version:
            return cached
        try:
            self._champion_cache = (info.version, self._load(info.version))
            return self._champion_cache
        except RegistryError as error:
            problem = str(error)
        self._metrics.registry_champion_unavailable.inc()
        stand_in = self._verified_before(info.version)
        log.error(
            "registry champion unavailable: compared with %s instead",
            "no champion" if stand_in is None else f"version {stand_in[0]}",
            extra={"champion": info.version, "reason": problem},
        )
        return stand_in

    def _load(self, version: int) -> ModelAdapter:
        blob = self._registry.load_artifact(version)  # sha256 + HMAC verified
        model: ModelAdapter = pickle.loads(blob)  # noqa: S301 - verified artifact of our own registry
        return model

    def _verified_before(self, version: int) -> tuple[int, ModelAdapter] | None:
        """The newest version below ``version`` whose artifact verifies, loaded."""
        try:
            older = [info.version for info in self._registry.list() if info.version < version]
        except RegistryError:
            return None
        for number in reversed(older):
            try:
                return number, self._load(number)
            except RegistryError as error:
                log.warning(
                    "version unavailable as a stand-in champion",
                    extra={"model_version": number, "reason": str(error)},
                )
        return None

    def _scores(
        self, state: TrainingState, trigger: str
    ) -> tuple[float | None, float | None, int | None]:
        """(champion, candidate) scores on the recent records, higher is better, and the
        version that stood for the champion (see :meth:`_champion`)."""
        X, y, predictions, _w = state.recent.arrays()
        if len(y) == 0 or trigger == "retrain":
            # A full retrain was gated on its holdout already; with no records since the
            # champion was published there is nothing the two could be compared on.
            return None, None, None
        settings = self._settings
        evaluator = PrequentialEvaluator(
            settings.model.task, [self._metric], len(y), settings.record.labels
        )
        evaluator.update(y, predictions, None)
        if evaluator.unscored == len(y) and state.model.parameters_finite():
            # Every recent record came before the model's first fit (mini_batch, full_batch):
            # there is no prediction to judge it by, which is not a bad score.
            return None, None, None
        candidate = evaluator.score(self._metric)
        champion = self._champion()
        if champion is None:
            return None, candidate, None
        score = evaluate_holdout(
            champion[1],
            X,
            y,
            task=settings.model.task,
            metric=self._metric,
            labels=settings.record.labels,
        )
        return score, candidate, champion[0]

    def _metadata(
        self,
        state: TrainingState,
        trigger: str,
        champion_score: float | None,
        candidate_score: float | None,
        champion_version: int | None = None,
    ) -> dict[str, Any]:
        settings = self._settings
        metadata: dict[str, Any] = {
            "model_name": settings.model.name,
            "parent_version": state.model_version,
            "trigger": trigger,
            "training_mode": settings.training.mode,
            "learner": state.model.describe(),
            "search": state.model_search,
            # Online selection (training.selection): method, candidates with params and
            # scores, the leader (whose model this is); None when off.
            "selection": None if state.selection is None else state.selection.summary(),
            "offsets_since_parent": state.ledger.since(state.published_ledger),
            "offsets_total": state.ledger.as_json(),
            "records_learnt": state.records_learnt,
            "retrains": state.retrains,
            "records_dead_lettered": state.records_dead_lettered,
            "metrics": state.metrics_snapshot(),
            "gate": {
                "metric": self._metric,
                "champion_version": champion_version,
                "champion_score": champion_score,
                "candidate_score": candidate_score,
                "margin": settings.registry.gate.margin,
                "holdout_records": state.recent.size,
            },
            "drift_events_since_parent": state.drift_since_publish,
            "config_hash": settings.config_hash(),
            "library_versions": library_versions(),
            "service_version": __version__,
        }
        if self._stamp is not None:
            metadata.update(self._stamp())
        return metadata

    def _unchanged_since(self, state: TrainingState) -> int | None:
        """The last version published from this state when the model has learnt nothing
        and not been retrained since (it would be published again as an identical copy)."""
        if state.model_version is None:
            return None
        try:
            last = self._registry.get(state.model_version).metadata
        except RegistryError:
            return None
        same = (
            last.get("records_learnt") == state.records_learnt
            and last.get("retrains", state.retrains) == state.retrains
        )
        return state.model_version if same else None

    def publish(self, state: TrainingState, trigger: str, now: float) -> VersionInfo | None:
        """Gate the current model and publish it as a version; None when rejected, or
        skipped because nothing was learnt since the last version (logged). Either way the
        publish period restarts at ``now`` (the service's clock). Every call's duration,
        raising ones included, goes to ``publish_duration_seconds``."""
        started = time.perf_counter()
        try:
            return self._publish(state, trigger, now)
        finally:
            self._metrics.publish_duration.observe(time.perf_counter() - started)

    def _publish(self, state: TrainingState, trigger: str, now: float) -> VersionInfo | None:
        self.last_rejection = None
        unchanged = self._unchanged_since(state)
        if unchanged is not None:
            self._restart(state, now)
            log.info(
                "publish skipped: nothing learnt since the last version",
                extra={"model_version": unchanged, "trigger": trigger},
            )
            return None
        champion_score, candidate_score, champion_version = self._scores(state, trigger)
        verdict = self._gate.decide(
            champion_score, candidate_score, state.model.parameters_finite()
        )
        accepted, reason = verdict.accepted, verdict.reason
        if trigger == "retrain" and verdict.code == "nothing_to_compare":
            # Not a missing comparison: the retrain's candidate passed the same gate on its
            # holdout (FullBatchTrainer._finish) before it replaced the model.
            reason = "gated at retrain"
        metadata = self._metadata(state, trigger, champion_score, candidate_score, champion_version)
        metadata["gate"].update(accepted=accepted, code=verdict.code, reason=reason)
        self._restart(state, now)
        if not accepted:
            self._registry.record_rejection(
                metadata,
                champion_score if champion_score is not None else float("nan"),
                candidate_score if candidate_score is not None else float("nan"),
            )
            self._metrics.versions_rejected.inc()
            self.last_rejection = reason
            log.warning(
                "candidate rejected by the gate", extra={"reason": reason, "code": verdict.code}
            )
            return None
        artifact = pickle.dumps(state.model, protocol=5)
        info = self._registry.publish(artifact, metadata, promote=True)
        self._crash.reached("after_version_files")
        if self._events is not None:
            self._events.publish(info, self._registry)
        state.model_version = info.version
        state.published_ledger = metadata["offsets_total"]
        # The new champion has learnt these records: the next gate must compare on later ones.
        state.recent.clear()
        state.drift_since_publish = 0
        self._metrics.versions_published.inc()
        if self._on_published is not None:
            self._on_published()
        self._metrics.set_model(
            info.version, str(metadata["learner"].get("path", "")), self._settings.training.mode
        )
        log.info(
            "model version published",
            extra={"model_version": info.version, "trigger": trigger, "reason": reason},
        )
        return info

    def record_rejection(self, state: TrainingState, outcome: RetrainOutcome) -> None:
        """Record a full-retrain candidate the gate refused."""
        metadata = self._metadata(
            state, f"retrain:{outcome.trigger}", outcome.champion_score, outcome.candidate_score
        )
        metadata["learner"] = outcome.candidate.describe()
        metadata["search"] = outcome.search
        metadata["gate"].update(accepted=False, code=outcome.code, reason=outcome.reason)
        self._metrics.versions_rejected.inc()
        try:
            self._registry.record_rejection(
                metadata,
                outcome.champion_score if outcome.champion_score is not None else float("nan"),
                float(np.nan_to_num(outcome.candidate_score, nan=float("nan"))),
            )
        except RegistryUnavailable as error:
            # The refused candidate is discarded either way; only its entry in the decision
            # log is missing. Stopping for that would make an object-store outage stop
            # training (and crash-loop it for as long as the outage lasts).
            log.warning(
                "registry unavailable: the gate's refusal is logged here, not in the registry",
                extra={
                    "trigger": outcome.trigger,
                    "champion_score": outcome.champion_score,
                    "candidate_score": outcome.candidate_score,
                    "reason": str(error),
                },
            )
