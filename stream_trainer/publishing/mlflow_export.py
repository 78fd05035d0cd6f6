"""Mirror of the model registry in MLflow's model registry (``registry.mlflow``).

Each published version becomes one MLflow run (metrics: the gate's scores and the
prequential metrics; params: the learner's; tags: the lineage) whose ``model/`` artifacts
are our verified artifact, its ``metadata.json`` and an ``MLmodel`` file, registered as a
version of one registered model; the MLflow version carries the same tags, and our
champion carries MLflow's ``champion`` alias.

Contracts:

- Our registry is the source of truth and the queue: an export pass lists it and exports,
  oldest first, every version MLflow lacks (found by the ``stream_trainer.version`` tag),
  then points the alias at our champion. So a version published while MLflow was down, or
  before a restart, is exported later; nothing is lost and nothing is held in memory.
- Never on the poll thread: :class:`MlflowExporter` runs passes on a daemon thread, woken by
  :meth:`MlflowExporter.notify` (after a publish) and every ``reconcile_interval_s`` (which
  also repairs an alias a CLI promote could not move). A failed pass is counted and retried
  with doubling backoff; training never waits for it.
- MLflow's version numbers are its own (1, 2, … in export order); ours is the tag.
- The REST API is spoken with the standard library: the service image carries no MLflow
  client (mlflow-skinny has 21 direct dependencies) and no HTTP library of its own.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from stream_trainer.config import MlflowSettings, Settings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.metrics import PREFIX
from stream_trainer.publishing.registry import Registry, RegistryError, VersionInfo

log = logging.getLogger(__name__)

ALIAS = "champion"
VERSION_TAG = "stream_trainer.version"
EXPORT_RESULTS = ("ok", "failed", "retried")
ARTIFACT_DIR = "model"
# MLflow's limits (3.x): param values 6000 chars, model version tag values 5000.
_PARAM_MAX = 6000
_TAG_MAX = 5000
_TRUNCATED = "…(truncated)"


class MlflowError(StreamTrainerError):
    """An MLflow request failed (unreachable, timed out, or answered an error)."""


# -------------------------------------------------------------------------- pure mapping


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_metrics(metadata: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a version's run: the gate's scores, the prequential metrics over the
    window and since start, and counts. Non-finite and missing values are left out."""
    found: dict[str, Any] = {}
    gate = metadata.get("gate") or {}
    found["gate.candidate_score"] = gate.get("candidate_score")
    found["gate.champion_score"] = gate.get("champion_score")
    prequential = metadata.get("metrics") or {}
    for scope in ("window", "total"):
        for name, value in (prequential.get(scope) or {}).items():
            found[f"prequential.{scope}.{name}"] = value
    found["prequential.records"] = prequential.get("records")
    for key in ("records_learnt", "retrains", "records_dead_lettered"):
        found[key] = metadata.get(key)
    search = metadata.get("search")
    if isinstance(search, dict):
        found["search.baseline_score"] = search.get("baseline_score")
        best = search.get("best")
        found["search.best_score"] = best.get("score") if isinstance(best, dict) else None
    return {key: float(value) for key, value in found.items() if _finite(value)}


def run_params(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The learner's parameters (``learner.<name>``), its path, the preprocessing steps and
    the training mode, as MLflow params (strings, clipped to MLflow's limit)."""
    learner = metadata.get("learner") or {}
    params: dict[str, str] = {
        "learner": str(learner.get("path", "")),
        "training_mode": str(metadata.get("training_mode", "")),
        "task": str(learner.get("task", "")),
    }
    for name, value in sorted((learner.get("params") or {}).items()):
        params[f"learner.{name}"] = value if isinstance(value, str) else _compact(value)
    steps = [step.get("path", "") for step in (learner.get("pipeline") or [])[:-1]]
    if steps:
        params["preprocessing"] = ",".join(steps)
    return {key[:250]: _clip(value, _PARAM_MAX) for key, value in params.items()}


def lineage_tags(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The lineage as tags (``stream_trainer.*``): our version, its parent, what it learnt
    (offsets since the parent and in total), why it was published, the config hash, the
    artifact's sha256 and a summary of a search that found its params."""
    plain = {
        "version": metadata.get("version"),
        "model_name": metadata.get("model_name"),
        "parent_version": metadata.get("parent_version"),
        "trigger": metadata.get("trigger"),
        "training_mode": metadata.get("training_mode"),
        "config_hash": metadata.get("config_hash"),
        "records_learnt": metadata.get("records_learnt"),
        "created_at": metadata.get("created_at"),
        "artifact_sha256": metadata.get("artifact_sha256"),
        "service_version": metadata.get("service_version"),
        "champion_when_published": metadata.get("champion"),
    }
    tags = {
        f"stream_trainer.{key}": str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in plain.items()
        if value is not None
    }
    for key in ("offsets_since_parent", "offsets_total", "gate", "library_versions"):
        if metadata.get(key) is not None:
            tags[f"stream_trainer.{key}"] = _compact(metadata[key])
    search = metadata.get("search")
    if isinstance(search, dict):
        # The trials themselves are too long for a tag; the run's metadata.json has them.
        summary = {k: v for k, v in search.items() if k not in ("trials", "space")}
        tags["stream_trainer.search"] = _compact(summary)
    return {key: _clip(value, _TAG_MAX) for key, value in tags.items()}


def mlmodel_text(metadata: Mapping[str, Any], run_id: str) -> str:
    """An ``MLmodel`` file naming our artifact in a ``stream_trainer`` flavor.

    No ``python_function`` flavor on purpose: a pyfunc loader would unpickle the artifact
    wherever MLflow loads it, without the HMAC check our readers do first. The file makes
    the folder a model to MLflow's UI and tools; loading stays with ``ModelReader``.
    """
    learner = metadata.get("learner") or {}
    flavor = {
        "artifact": "model.pkl",
        "metadata": "metadata.json",
        "format": "pickle (protocol 5) of a stream_trainer ModelAdapter",
        "sha256": metadata.get("artifact_sha256"),
        "signed": metadata.get("artifact_hmac") is not None,
        "learner": learner.get("path"),
        "service_version": metadata.get("service_version"),
        "version": metadata.get("version"),
    }
    lines = [
        f"artifact_path: {ARTIFACT_DIR}",
        "flavors:",
        "  stream_trainer:",
        *(f"    {key}: {json.dumps(value)}" for key, value in flavor.items()),
        f"run_id: {run_id}",
        f"utc_time_created: {json.dumps(str(metadata.get('created_at', '')))}",
    ]
    return "\n".join(lines) + "\n"


def next_backoff(current: float, settings: MlflowSettings) -> float:
    """The wait after another failure: doubled, capped at ``retry_backoff_max_s``."""
    return min(current * 2, settings.retry_backoff_max_s)


# -------------------------------------------------------------------------- REST client


class MlflowClient:
    """The few MLflow REST calls the export needs (``/api/2.0/mlflow``, artifact proxy)."""

    def __init__(self, settings: MlflowSettings) -> None:
        if settings.tracking_uri is None:
            raise MlflowError("registry.mlflow.tracking_uri is not set")
        self._base = settings.tracking_uri.rstrip("/")
        self._timeout = settings.request_timeout_s
        self._auth = settings.authorization()
        self._ssl: ssl.SSLContext | None = None
        if settings.ssl_ca_location is not None:
            try:
                self._ssl = ssl.create_default_context(cafile=str(settings.ssl_ca_location))
            except (OSError, ssl.SSLError) as error:
                raise MlflowError(f"registry.mlflow.ssl_ca_location: {error}") from None

    def _request(
        self, method: str, path: str, body: bytes | None, content_type: str
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self._base}{path}", data=body, method=method)  # noqa: S310 - http(s) only (config pattern)
        request.add_header("Content-Type", content_type)
        if self._auth is not None:
            request.add_header("Authorization", self._auth)
        try:
            opened = urllib.request.urlopen(  # noqa: S310 - http(s) only (config pattern)
                request, timeout=self._timeout, context=self._ssl
            )
            with opened as answer:
                return int(answer.status), answer.read()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read()
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise MlflowError(f"MLflow at {self._base} unreachable: {reason}") from None

    def call(
        self,
        method: str,
        endpoint: str,
        payload: Mapping[str, Any] | None = None,
        *,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """One ``/api/2.0/mlflow/<endpoint>`` call; GET payloads go in the query string.
        Returns the JSON answer; None for RESOURCE_DOES_NOT_EXIST when ``missing_ok``."""
        path = f"/api/2.0/mlflow/{endpoint}"
        body = None
        if method == "GET" and payload:
            path += "?" + urllib.parse.urlencode(payload)
        elif payload is not None:
            body = json.dumps(payload).encode()
        status, raw = self._request(method, path, body, "application/json")
        try:
            answer: dict[str, Any] = json.loads(raw or b"{}")
        except ValueError:
            answer = {"message": raw[:200].decode("utf-8", "replace")}
        if status == 200:
            return answer
        code = answer.get("error_code", "")
        # An unknown alias is INVALID_PARAMETER_VALUE "... not found" (MLflow 3.x).
        missing = code == "RESOURCE_DOES_NOT_EXIST" or (
            code == "INVALID_PARAMETER_VALUE" and "not found" in str(answer.get("message", ""))
        )
        if missing_ok and missing:
            return None
        raise MlflowError(
            f"MLflow {endpoint}: HTTP {status} {code} {answer.get('message', '')}".strip()
        )

    def upload(self, artifact_uri: str, relative: str, data: bytes) -> None:
        """PUT ``data`` under a run's ``mlflow-artifacts:`` URI through the artifact proxy."""
        prefix = "mlflow-artifacts:"
        if not artifact_uri.startswith(prefix):
            raise MlflowError(
                f"run artifact URI {artifact_uri!r} is not proxied: start the server with "
                "--serve-artifacts (its default artifact root must be mlflow-artifacts:/)"
            )
        location = artifact_uri[len(prefix) :].lstrip("/")
        path = f"/api/2.0/mlflow-artifacts/artifacts/{location}/{relative}"
        status, raw = self._request(
            "PUT", urllib.parse.quote(path), data, "application/octet-stream"
        )
        if status != 200:
            raise MlflowError(f"MLflow artifact upload {relative}: HTTP {status} {raw[:200]!r}")


# -------------------------------------------------------------------------- export


@dataclass(frozen=True)
class MlflowTarget:
    """Where versions go: the registered model and the experiment (plain values)."""

    model: str
    experiment: str

    @classmethod
    def of(cls, settings: Settings) -> MlflowTarget:
        cfg = settings.registry.mlflow
        return cls(
            model=cfg.registered_model_name or settings.model.name,
            experiment=cfg.experiment or f"stream-trainer/{settings.model.name}",
        )


class MlflowMirror:
    """Synchronous export and alias logic over one client (no threads, no metrics)."""

    def __init__(self, client: MlflowClient, target: MlflowTarget) -> None:
        self._client = client
        self._target = target
        self._experiment_id: str | None = None
        self._model_ready = False

    def forget(self) -> None:
        """Drop what is cached about MLflow (after a failure: the registered model or the
        experiment may have been deleted there)."""
        self._experiment_id = None
        self._model_ready = False

    def exported(self) -> dict[int, str]:
        """{our version: MLflow version} of every version MLflow holds for the model."""
        found: dict[int, str] = {}
        token: str | None = None
        while True:
            query = {"filter": f"name='{self._target.model}'", "max_results": "1000"}
            if token:
                query["page_token"] = token
            answer = self._client.call("GET", "model-versions/search", query) or {}
            for entry in answer.get("model_versions", []):
                tags = {tag["key"]: tag.get("value") for tag in entry.get("tags", [])}
                ours = tags.get(VERSION_TAG)
                if ours is not None and ours.isdigit():
                    found[int(ours)] = str(entry["version"])
            token = answer.get("next_page_token")
            if not token:
                return found

    def _ensure_model(self) -> None:
        if self._model_ready:
            return
        known = self._client.call(
            "GET", "registered-models/get", {"name": self._target.model}, missing_ok=True
        )
        if known is None:
            self._client.call(
                "POST",
                "registered-models/create",
                {
                    "name": self._target.model,
                    "description": "Versions published by stream-trainer (mirror).",
                },
            )
        self._model_ready = True

    def _experiment(self) -> str:
        if self._experiment_id is None:
            name = self._target.experiment
            got = self._client.call(
                "GET", "experiments/get-by-name", {"experiment_name": name}, missing_ok=True
            )
            if got is not None:
                self._experiment_id = str(got["experiment"]["experiment_id"])
            else:
                made = self._client.call("POST", "experiments/create", {"name": name}) or {}
                self._experiment_id = str(made["experiment_id"])
        return self._experiment_id

    def export(self, info: VersionInfo, artifact: bytes) -> str:
        """Register ``info`` (its verified ``artifact``); returns the MLflow version.

        A crash or failure midway can leave a run without a registered version behind
        (harmless: the retry makes a new run); the registered version is made last."""
        self._ensure_model()
        metadata = info.metadata
        tags = lineage_tags(metadata)
        created = _epoch_ms(metadata.get("created_at"))
        run = (
            self._client.call(
                "POST",
                "runs/create",
                {
                    "experiment_id": self._experiment(),
                    "run_name": f"{self._target.model}-v{info.version}",
                    "start_time": created,
                    "tags": _pairs(tags),
                },
            )
            or {}
        )["run"]["info"]
        run_id, artifact_uri = run["run_id"], run["artifact_uri"]
        step = info.version
        self._client.call(
            "POST",
            "runs/log-batch",
            {
                "run_id": run_id,
                "metrics": [
                    {"key": key, "value": value, "timestamp": created, "step": step}
                    for key, value in run_metrics(metadata).items()
                ],
                "params": _pairs(run_params(metadata)),
            },
        )
        metadata_bytes = json.dumps(metadata, sort_keys=True, indent=2).encode()
        self._client.upload(artifact_uri, f"{ARTIFACT_DIR}/model.pkl", artifact)
        self._client.upload(artifact_uri, f"{ARTIFACT_DIR}/metadata.json", metadata_bytes)
        self._client.upload(
            artifact_uri, f"{ARTIFACT_DIR}/MLmodel", mlmodel_text(metadata, run_id).encode()
        )
        self._client.call(
            "POST",
            "runs/update",
            {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)},
        )
        made = (
            self._client.call(
                "POST",
                "model-versions/create",
                {
                    "name": self._target.model,
                    "source": f"runs:/{run_id}/{ARTIFACT_DIR}",
                    "run_id": run_id,
                    "tags": _pairs(tags),
                    "description": f"stream-trainer version {info.version} "
                    f"(trigger {metadata.get('trigger')}, parent {metadata.get('parent_version')})",
                },
            )
            or {}
        )
        return str(made["model_version"]["version"])

    def alias_version(self) -> str | None:
        """The MLflow version the ``champion`` alias points at, or None."""
        answer = self._client.call(
            "GET",
            "registered-models/alias",
            {"name": self._target.model, "alias": ALIAS},
            missing_ok=True,
        )
        return None if answer is None else str(answer["model_version"]["version"])

    def set_alias(self, mlflow_version: str) -> None:
        """Point the ``champion`` alias at ``mlflow_version``."""
        self._client.call(
            "POST",
            "registered-models/alias",
            {"name": self._target.model, "alias": ALIAS, "version": mlflow_version},
        )


def _pairs(mapping: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in mapping.items()]


def _epoch_ms(stamp: Any) -> int:
    from datetime import datetime  # noqa: PLC0415 - only here

    try:
        return int(datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return int(time.time() * 1000)


def move_champion_alias(settings: Settings, registry: Registry) -> str:
    """Point MLflow's alias at ``registry``'s champion now (the CLI's promote / rollback);
    returns what happened, for the user. Raises MlflowError when MLflow cannot be reached
    or the version is not exported yet (the service's exporter will do both later)."""
    champion = registry.champion()
    if champion is None:
        return "MLflow: no champion to point the alias at"
    mirror = MlflowMirror(MlflowClient(settings.registry.mlflow), MlflowTarget.of(settings))
    target = mirror.exported().get(champion.version)
    if target is None:
        raise MlflowError(
            f"version {champion.version} is not in MLflow yet: the service exports it and "
            f"moves the `{ALIAS}` alias"
        )
    mirror.set_alias(target)
    return f"MLflow: `{ALIAS}` alias -> MLflow version {target} (ours {champion.version})"


# -------------------------------------------------------------------------- background


@dataclass
class MlflowMetrics:
    """``stream_trainer_mlflow_*`` metrics (only registered when the export is enabled)."""

    exports: Counter
    pending: Gauge
    alias_moves: Counter

    @classmethod
    def build(cls, registry: CollectorRegistry) -> MlflowMetrics:
        metrics = cls(
            exports=Counter(
                f"{PREFIX}_mlflow_exports",
                "MLflow export: ok counts versions exported; failed counts export passes "
                "that failed (MLflow unreachable or erroring); retried counts passes that "
                "retried after a failed one.",
                ["result"],
                registry=registry,
            ),
            pending=Gauge(
                f"{PREFIX}_mlflow_export_pending",
                "Published versions not yet in MLflow (at the end of the last export pass).",
                registry=registry,
            ),
            alias_moves=Counter(
                f"{PREFIX}_mlflow_alias_moves",
                "Moves of MLflow's champion alias made by the service.",
                registry=registry,
            ),
        )
        for result in EXPORT_RESULTS:
            metrics.exports.labels(result=result)
        return metrics


class MlflowExporter:
    """Runs export passes (see the module docstring) on a daemon thread.

    :meth:`notify` never blocks; :meth:`close` returns within ``timeout`` (an in-flight
    request is abandoned with the daemon thread; the next start's pass finishes the job).
    """

    def __init__(
        self,
        settings: MlflowSettings,
        mirror: MlflowMirror,
        registry: Registry,
        metrics: MlflowMetrics,
        wait: Callable[[threading.Event, float], bool] | None = None,
    ) -> None:
        self._settings = settings
        self._mirror = mirror
        self._registry = registry
        self._metrics = metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._known: dict[int, str] | None = None
        self._retrying = False
        self._thread: threading.Thread | None = None
        self._wait = wait or (lambda event, seconds: event.wait(seconds))

    @classmethod
    def build(
        cls, settings: Settings, registry: Registry, collector: CollectorRegistry
    ) -> MlflowExporter:
        """From the service's settings (plain values kept, not the tree)."""
        cfg = settings.registry.mlflow
        mirror = MlflowMirror(MlflowClient(cfg), MlflowTarget.of(settings))
        return cls(cfg, mirror, registry, MlflowMetrics.build(collector))

    def start(self) -> None:
        """Start the thread; its first pass reconciles whatever MLflow lacks."""
        self._thread = threading.Thread(target=self._run, name="mlflow-export", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A version was published or the champion moved: run a pass soon."""
        self._wake.set()

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread (bounded by ``timeout``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self._settings.retry_backoff_initial_s
        while not self._stop.is_set():
            try:
                self.sync_once()
            except (MlflowError, RegistryError) as error:
                # The registered model or the experiment may have been deleted there.
                self._mirror.forget()
                self._retrying = True
                self._metrics.exports.labels(result="failed").inc()
                log.warning(
                    "MLflow export failed; retrying",
                    extra={"reason": str(error), "retry_in_s": backoff},
                )
                # Backoff even when notified: a publish must not make a down server busier.
                self._wait(self._stop, backoff)
                backoff = next_backoff(backoff, self._settings)
                continue
            backoff = self._settings.retry_backoff_initial_s
            self._wait(self._wake, self._settings.reconcile_interval_s)
            self._wake.clear()

    def sync_once(self) -> None:
        """One pass: export what MLflow lacks (oldest first), then move the alias to our
        champion if it points elsewhere. Raises MlflowError / RegistryError on failure."""
        if self._retrying:
            self._metrics.exports.labels(result="retried").inc()
        versions = self._registry.list()
        cached = self._known or {}
        # Before MLflow answers, every version not known to be there counts as pending.
        self._metrics.pending.set(sum(info.version not in cached for info in versions))
        if self._known is None:
            self._known = self._mirror.exported()
        known = self._known
        missing = [info for info in versions if info.version not in known]
        self._metrics.pending.set(len(missing))
        for info in missing:
            if self._stop.is_set():
                return
            self._export(info, known)
        self._sync_alias()
        self._retrying = False

    def _export(self, info: VersionInfo, known: dict[int, str]) -> None:
        try:
            # Verified (sha256 + HMAC): a tampered artifact is never exported.
            artifact = self._registry.load_artifact(info.version)
        except RegistryError:
            if _gone(self._registry, info.version):
                return  # removed by retention since the listing: nothing to export
            raise
        try:
            known[info.version] = self._mirror.export(info, artifact)
        except MlflowError:
            self._known = None  # a half-done attempt may have changed what MLflow holds
            raise
        self._metrics.exports.labels(result="ok").inc()
        self._metrics.pending.dec()
        log.info(
            "version exported to MLflow",
            extra={"model_version": info.version, "mlflow_version": known[info.version]},
        )

    def _sync_alias(self) -> None:
        champion = self._registry.champion()
        if champion is None or self._known is None:
            return
        target = self._known.get(champion.version)
        if target is None or self._mirror.alias_version() == target:
            return
        self._mirror.set_alias(target)
        self._metrics.alias_moves.inc()
        log.info(
            "MLflow champion alias moved",
            extra={"model_version": champion.version, "mlflow_version": target},
        )


def _gone(registry: Registry, version: int) -> bool:
    try:
        registry.get(version)
    except RegistryError:
        return True
    return False
