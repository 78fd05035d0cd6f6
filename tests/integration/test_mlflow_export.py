"""MLflow export against a real MLflow tracking server (SQLite, artifact proxy) and, for
the service tests, a real broker."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_trainer.config import MlflowSettings
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.embedded import free_port
from stream_trainer.laptop.produce import produce
from stream_trainer.publishing.mlflow_export import (
    ALIAS,
    VERSION_TAG,
    MlflowClient,
    MlflowExporter,
    MlflowMetrics,
    MlflowMirror,
    MlflowTarget,
)
from stream_trainer.publishing.registry import ModelRegistry
from stream_trainer.testing.mlflow_server import MlflowServer, venv_home
from tests.conftest import KAFKA_ONLY
from tests.harness import HMAC_KEY, ServiceProcess, service_config, unique, wait_for

pytestmark = pytest.mark.integration

PHISHING = get_dataset("phishing")


class MlflowView:
    """What a user of MLflow sees of one registered model (read through the REST API)."""

    def __init__(self, url: str, model: str) -> None:
        self.client = MlflowClient(MlflowSettings(enabled=True, tracking_uri=url))
        self.model = model

    def versions(self) -> dict[int, dict[str, Any]]:
        """{our version: MLflow model version (with a ``tags`` dict)}."""
        answer = self.client.call(
            "GET", "model-versions/search", {"filter": f"name='{self.model}'"}
        )
        found = {}
        for entry in (answer or {}).get("model_versions", []):
            entry["tags"] = {t["key"]: t["value"] for t in entry.get("tags", [])}
            found[int(entry["tags"][VERSION_TAG])] = entry
        return found

    def run(self, run_id: str) -> dict[str, Any]:
        data = (self.client.call("GET", "runs/get", {"run_id": run_id}) or {})["run"]["data"]
        return {
            "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
            "params": {p["key"]: p["value"] for p in data.get("params", [])},
            "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
        }

    def alias(self) -> str | None:
        answer = self.client.call(
            "GET",
            "registered-models/alias",
            {"name": self.model, "alias": ALIAS},
            missing_ok=True,
        )
        return None if answer is None else str(answer["model_version"]["version"])


def _download_with_mlflow(url: str, model_uri: str, dest: Path) -> Path:
    """Download ``model_uri`` with MLflow's own client (from the server's venv)."""
    script = (
        "import mlflow, sys\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "uri, dst = sys.argv[2], sys.argv[3]\n"
        "print(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))\n"
    )
    result = subprocess.run(
        [str(venv_home() / "bin" / "python"), "-c", script, url, model_uri, str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": url},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(result.stdout.strip().splitlines()[-1])


def _registry(root: Path, name: str = "model") -> ModelRegistry:
    return ModelRegistry(root, name, HMAC_KEY.encode(), keep_last=100)


def _exporter(url: str, registry: ModelRegistry, model: str) -> tuple[MlflowExporter, Any]:
    settings = MlflowSettings(enabled=True, tracking_uri=url)
    collector = CollectorRegistry()
    mirror = MlflowMirror(MlflowClient(settings), MlflowTarget(model, f"exp-{model}"))
    return MlflowExporter(settings, mirror, registry, MlflowMetrics.build(collector)), collector


def test_reconcile_exports_what_mlflow_lacks_once_across_restarts(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # Versions published while no exporter ran (MLflow off, or a crash before the export):
    # a new exporter (a restart) exports each of them exactly once, in order.
    registry = _registry(tmp_path / "registry")
    artifacts = [f"artifact {n}".encode() * 50 for n in range(3)]
    for number, artifact in enumerate(artifacts):
        registry.publish(
            artifact,
            {
                "parent_version": number or None,
                "trigger": "count",
                "records_learnt": 100 * (number + 1),
                "metrics": {"window": {"accuracy": 0.5 + number / 10}, "total": {}, "records": 5},
                "gate": {"candidate_score": 0.6, "champion_score": None},
                "learner": {"path": "river.linear_model.LogisticRegression", "params": {"l2": 0}},
                "config_hash": "abc",
            },
            promote=number != 1,  # version 2 is not the champion
        )
    model = unique("reconcile")
    view = MlflowView(mlflow_server.url, model)

    first, collector = _exporter(mlflow_server.url, registry, model)
    first.sync_once()
    exported = view.versions()
    assert sorted(exported) == [1, 2, 3]
    assert [exported[n]["version"] for n in (1, 2, 3)] == ["1", "2", "3"]  # oldest first
    assert view.alias() == exported[3]["version"]
    assert collector.get_sample_value("stream_trainer_mlflow_exports_total", {"result": "ok"}) == 3

    second, collector2 = _exporter(mlflow_server.url, registry, model)
    second.sync_once()
    assert sorted(view.versions()) == [1, 2, 3], "a restart must not export a version twice"
    assert collector2.get_sample_value("stream_trainer_mlflow_exports_total", {"result": "ok"}) == 0

    registry.rollback("test")  # back to version 1 (3 was promoted over 1)
    second.sync_once()
    assert view.alias() == exported[1]["version"]


def _produce(config: dict[str, Any], count: int, seed: int = 1) -> None:
    produce(
        {"bootstrap.servers": config["kafka"]["bootstrap_servers"]},
        config["topics"]["input"][0],
        PHISHING,
        count,
        seed=seed,
    )


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_trainer", "versions", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY},
    )


def _mlflow_config(tmp_path: Path, broker: Any, url: str) -> dict[str, Any]:
    return service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        overrides={
            "registry": {
                "publish_every_records": 300,
                "gate": {"enabled": False},
                "mlflow": {
                    "enabled": True,
                    "tracking_uri": url,
                    "registered_model_name": unique("phishing"),
                    "retry_backoff_initial_s": 0.2,
                    "retry_backoff_max_s": 1.0,
                    "reconcile_interval_s": 1.0,
                },
            },
            "kafka": {"consume_batch_size": 100},
            "model": {"learner": {"params": {"l2": 0.001}}},
        },
    )


# The export to MLflow: the broker only delivers the records (see KAFKA_ONLY).
@KAFKA_ONLY
def test_published_versions_appear_in_mlflow_and_the_cli_moves_the_alias(
    broker: Any, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    config = _mlflow_config(tmp_path, broker, mlflow_server.url)
    name = config["registry"]["mlflow"]["registered_model_name"]
    registry = _registry(Path(config["registry"]["root"]))
    view = MlflowView(mlflow_server.url, name)
    _produce(config, 1000)
    with ServiceProcess(config, tmp_path) as service:
        service.wait_metric("stream_trainer_records_learnt_total", 1000)
        service.wait_metric("stream_trainer_versions_published_total", 3)
        ours = [info.version for info in registry.list()]
        wait_for(lambda: sorted(view.versions()) == ours, 60, f"versions {ours} in MLflow")
        current = registry.champion()
        assert current is not None
        exported = view.versions()
        want = exported[current.version]["version"]
        wait_for(lambda: view.alias() == want, 30, "the alias")
        metrics = service.metrics()
        assert metrics['stream_trainer_mlflow_exports_total{result="ok"}'] == len(ours)
        assert metrics['stream_trainer_mlflow_exports_total{result="failed"}'] == 0
        assert service.stop() == 0
    print(f"exported {ours} as MLflow versions {[exported[n]['version'] for n in ours]}")

    # Metrics, params and lineage on each version's run and model version.
    for info in registry.list():
        version = exported[info.version]
        tags = version["tags"]
        assert tags["stream_trainer.config_hash"] == info.metadata["config_hash"]
        parent = info.metadata["parent_version"]
        assert tags.get("stream_trainer.parent_version") == (
            None if parent is None else str(parent)
        )
        assert tags["stream_trainer.trigger"] == info.metadata["trigger"] == "records"
        assert json.loads(tags["stream_trainer.offsets_total"]) == info.metadata["offsets_total"]
        assert tags["stream_trainer.records_learnt"] == str(info.metadata["records_learnt"])
        run = view.run(version["run_id"])
        assert run["tags"]["stream_trainer.artifact_sha256"] == info.metadata["artifact_sha256"]
        assert run["metrics"]["records_learnt"] == info.metadata["records_learnt"]
        window = info.metadata["metrics"]["window"]
        assert run["metrics"]["prequential.window.accuracy"] == pytest.approx(window["accuracy"])
        assert run["params"]["learner"] == "river.linear_model.LogisticRegression"
        assert run["params"]["learner.l2"] == "0.001"

    # The champion's artifact, downloaded with MLflow's own client, is ours byte for byte.
    folder = _download_with_mlflow(mlflow_server.url, f"models:/{name}@{ALIAS}", tmp_path / "dl")
    champion = registry.champion()
    assert champion is not None
    downloaded = (folder / "model.pkl").read_bytes()
    assert hashlib.sha256(downloaded).hexdigest() == champion.metadata["artifact_sha256"]
    assert downloaded == registry.load_artifact(champion.version)
    assert json.loads((folder / "metadata.json").read_text())["version"] == champion.version
    assert "stream_trainer:" in (folder / "MLmodel").read_text()

    # The CLI's rollback and promote move the alias with our champion.
    config_path = tmp_path / "service.yaml"
    result = _cli(config_path, "rollback")
    assert result.returncode == 0, result.stderr
    back = registry.champion()
    assert back is not None and back.version != champion.version
    assert view.alias() == exported[back.version]["version"], result.stdout + result.stderr
    result = _cli(config_path, "promote", str(ours[0]))
    assert result.returncode == 0, result.stderr
    assert view.alias() == exported[ours[0]]["version"], result.stdout + result.stderr


@KAFKA_ONLY
def test_mlflow_down_at_publish_training_goes_on_and_the_version_appears_later(
    broker: Any, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # mlflow_server: MLflow is installed (and its availability rule applied); this test
    # runs its own server, down when the service publishes.
    port = free_port()
    late = MlflowServer(port=port)
    config = _mlflow_config(tmp_path, broker, f"http://127.0.0.1:{port}")
    name = config["registry"]["mlflow"]["registered_model_name"]
    registry = _registry(Path(config["registry"]["root"]))
    _produce(config, 700)
    try:
        with ServiceProcess(config, tmp_path) as service:
            service.wait_metric("stream_trainer_records_learnt_total", 700)
            service.wait_metric("stream_trainer_versions_published_total", 2)
            service.wait_metric('stream_trainer_mlflow_exports_total{result="failed"}', 2)
            # The versions wait for MLflow (pending), the records were all learnt meanwhile.
            service.wait_metric("stream_trainer_mlflow_export_pending", 2)
            published = [info.version for info in registry.list()]

            late.start()
            view = MlflowView(late.url, name)
            wait_for(
                lambda: sorted(view.versions()) == published,
                60,
                f"versions {published} in MLflow after it came back",
            )
            service.wait_metric('stream_trainer_mlflow_exports_total{result="ok"}', len(published))
            metrics = service.metrics()
            retried = metrics['stream_trainer_mlflow_exports_total{result="retried"}']
            failed = metrics['stream_trainer_mlflow_exports_total{result="failed"}']
            assert retried >= 1
            champion = registry.champion()
            assert champion is not None
            exported = view.versions()
            want = exported[champion.version]["version"]
            wait_for(lambda: view.alias() == want, 30, "the alias")
            assert service.stop() == 0
        print(
            f"MLflow down at publish: {int(failed)} failed attempts, {int(retried)} retried, "
            f"{len(published)} versions exported after it came back"
        )

        # A rollback while MLflow is down succeeds with a warning; the next start of the
        # service moves the alias.
        late.stop()
        result = _cli(tmp_path / "service.yaml", "rollback")
        assert result.returncode == 0, result.stderr
        assert "MLflow alias not moved now" in result.stderr
        back = registry.champion()
        assert back is not None and back.version != champion.version
        late.start()
        assert view.alias() == want  # still the old champion's
        with ServiceProcess(config, tmp_path, name="second") as service:
            wanted = exported[back.version]["version"]
            wait_for(lambda: view.alias() == wanted, 60, "the alias after the restart")
            assert service.stop() == 0
    finally:
        late.close()
