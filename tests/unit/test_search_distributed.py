"""Distributed search pieces without a database or cluster: the signed snapshot, the
database URL's sources, the Job made from the chart's template, the Job's state."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_trainer.operations.logs import clear_secrets, redact_text
from stream_trainer.training.learners import build_model
from stream_trainer.training.search.kube_jobs import (
    FAILED,
    MAX_NAME,
    RUNNING,
    STUDY_LABEL,
    SUCCEEDED,
    KubeApiError,
    in_cluster_url,
    job_manifest,
    job_name,
    job_state,
)
from stream_trainer.training.search.search import search_spec
from stream_trainer.training.search.snapshot import (
    MAGIC,
    Snapshot,
    SnapshotError,
    read_snapshot,
    write_snapshot,
)
from stream_trainer.training.search.study import (
    DATABASE_URL_ENV,
    DATABASE_URL_FILE_ENV,
    StudyError,
    database_url,
    scrub,
)
from tests.unit.test_search import make_settings

KEY = b"a-checkpoint-key-0123456789abcdef"


def _snapshot() -> Snapshot:
    settings = make_settings()
    spec = search_spec(settings)
    assert spec is not None
    X = np.arange(40, dtype=float).reshape(20, 2)
    y = np.array([0, 1] * 10)
    return Snapshot(build_model(settings), (X[:16], y[:16], None), (X[16:], y[16:]), spec)


def test_snapshot_round_trip_is_content_addressed(tmp_path: Path) -> None:
    snapshot = _snapshot()
    path = write_snapshot(tmp_path, snapshot, KEY)
    again = write_snapshot(tmp_path, snapshot, KEY)
    assert again == path and len(list(tmp_path.iterdir())) == 1
    loaded, sha256 = read_snapshot(path, KEY)
    assert path.name == f"window-{sha256}.snap"
    assert np.array_equal(loaded.train[0], snapshot.train[0])
    assert loaded.spec == snapshot.spec


def _manifest_span(data: bytes) -> tuple[int, int]:
    (length,) = struct.unpack_from(">I", data, len(MAGIC))
    return len(MAGIC) + 4, len(MAGIC) + 4 + length


def test_a_changed_manifest_or_another_key_is_a_bad_signature(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, _snapshot(), KEY)
    with pytest.raises(SnapshotError, match="bad signature"):
        read_snapshot(path, b"another-key")
    data = path.read_bytes()
    start, end = _manifest_span(data)
    manifest = json.loads(data[start:end])
    manifest["train_records"] += 1
    body = json.dumps(manifest).encode()
    path.write_bytes(MAGIC + struct.pack(">I", len(body)) + body + data[end:])
    with pytest.raises(SnapshotError, match=r"bad signature.*refusing to load it"):
        read_snapshot(path, KEY)


def test_a_changed_payload_or_name_is_refused(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, _snapshot(), KEY)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="does not match its sha256"):
        read_snapshot(path, KEY)
    other = write_snapshot(tmp_path / "b", _snapshot(), KEY)
    renamed = other.with_name("window-" + "0" * 64 + ".snap")
    other.rename(renamed)
    with pytest.raises(SnapshotError, match="name does not match"):
        read_snapshot(renamed, KEY)


def test_a_snapshot_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="must be signed"):
        write_snapshot(tmp_path, _snapshot(), b"")


def test_database_url_from_env_or_file_only(tmp_path: Path) -> None:
    url = "postgresql://u:s3cret@db:5432/studies"
    assert database_url({DATABASE_URL_ENV: url}) == url
    secret = tmp_path / "url"
    secret.write_text(url + "\n", encoding="utf-8")
    assert database_url({DATABASE_URL_FILE_ENV: str(secret)}) == url
    with pytest.raises(StudyError, match="never read from the config file"):
        database_url({})
    assert "s3cret" not in scrub(f"could not connect to {url}: password s3cret refused", url)


def _template() -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "fraud-search", "labels": {"a": "b"}},
        "spec": {
            "completionMode": "Indexed",
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "w", "args": ["search", "worker", "--config", "/c.yaml"]}
                    ],
                }
            },
        },
    }


def test_job_manifest_adds_the_study_snapshot_and_parallelism() -> None:
    template = _template()
    job = job_manifest(template, "n", "study-1", Path("/snap/window-x.snap"), 3)
    assert job["metadata"]["name"] == "n"
    assert job["metadata"]["labels"] == {"a": "b", STUDY_LABEL: "study-1"}
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 3
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "search", "worker", "--config", "/c.yaml",
        "--study", "study-1", "--snapshot", "/snap/window-x.snap",
    ]  # fmt: skip
    assert template["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "/c.yaml"
    with pytest.raises(KubeApiError, match="not a Job"):
        job_manifest({"kind": "Pod"}, "n", "s", Path("/x"), 1)


def test_job_names_are_dns_labels_within_bounds() -> None:
    name = job_name("A_Very_Long_Model_Name" * 4 + "-search", "0123456789-18f2a")
    assert len(name) <= MAX_NAME
    assert name.endswith("-0123456789-18f2a")
    assert name == name.lower() and "_" not in name and not name.startswith("-")


def test_job_state_from_conditions() -> None:
    assert job_state({"status": {}}) == RUNNING
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == (
        SUCCEEDED
    )
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == FAILED
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "False"}]}}) == (
        RUNNING
    )
    assert job_state(None) == FAILED


def test_in_cluster_url_needs_the_pod_environment() -> None:
    assert in_cluster_url({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "https://10.0.0.1:443"
    assert (
        in_cluster_url(
            {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT_HTTPS": "6443"}
        )
        == "https://[fd00::1]:6443"
    )
    with pytest.raises(KubeApiError, match="api_server"):
        in_cluster_url({})


def test_the_database_url_and_its_password_are_masked_in_logs() -> None:
    url = "postgresql://u:pw-7f3a91c2@db:5432/studies"
    try:
        database_url({DATABASE_URL_ENV: url})
        assert "pw-7f3a91c2" not in redact_text(f"connect {url} failed; password pw-7f3a91c2")
    finally:
        clear_secrets()
