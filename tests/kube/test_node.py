"""The chart installed with the real helm CLI into a single-node cluster whose pod runs.

The node (tests/kube/node_env.py) is containerd + kubelet + kube-scheduler +
kube-controller-manager + kube-proxy (and a DNS stand-in for Service names) next to the API
server; the pod runs the project image built by the container tests. What is shown: the
claim binds to a hostPath volume, the Deployment's pod is scheduled, starts under Pod
Security ``restricted``, becomes Ready and learns the test Kafka's records; deleting it
(``kubectl delete pod``) brings a new pod that resumes from the same volume with nothing
lost and nothing learnt twice (counted from the pods' metrics, the final checkpoint's
ledger, which spans both pods only if the second resumed from the volume, and the group's
committed offsets on the broker); ``helm test`` reaches ``/readyz`` through the Service.

Kafka for the pods listens on the host's primary address: a pod's loopback is its own,
Pod Security ``restricted`` forbids ``hostNetwork``, and the bridge routes pod traffic to
any host address. The session's loopback broker stays as it is.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.embedded import create_topics
from stream_trainer.testing.kafka_broker import KafkaBroker
from tests.faults.support import (
    LEARNT,
    committed_offsets,
    covers,
    end_offsets,
    judge,
    load_final,
    manifest_offsets,
    produce_records,
)
from tests.harness import HMAC_KEY, read_topic, unique, wait_for
from tests.kube.kube_env import ApiServer, conditions
from tests.kube.node_env import Node
from tests.kube.test_helm_install import (
    CHART_DIR,
    FULLNAME,
    RELEASE,
    _create,
    _path,
    make_namespace,
)

pytestmark = [pytest.mark.kube, pytest.mark.container, pytest.mark.timeout(1800)]

PUBLISHED = "stream_trainer_versions_published_total"
DATASET = "phishing"
FIRST, SECOND = 900, 300  # records before the first pod, and after it is deleted
UID = 10001  # the chart's runAsUser/fsGroup: a hostPath volume is not chowned for it


def _pods(kube: ApiServer, namespace: str) -> list[dict[str, Any]]:
    """The Deployment's pods (not the `helm test` pod), oldest first."""
    selector = {"labelSelector": f"app.kubernetes.io/instance={RELEASE}"}
    items = kube.request("GET", _path("Pod", namespace), params=selector).body["items"]
    owned = [p for p in items if p["metadata"].get("ownerReferences")]
    return sorted(owned, key=lambda p: p["metadata"]["creationTimestamp"])


def _ready(pod: dict[str, Any]) -> bool:
    ready = conditions(pod).get("Ready") == "True"
    return ready and pod["metadata"].get("deletionTimestamp") is None


def _ready_pod(kube: ApiServer, namespace: str, not_uid: str, timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        fresh = [p for p in _pods(kube, namespace) if p["metadata"]["uid"] != not_uid and _ready(p)]
        return fresh[-1] if fresh else None

    found: dict[str, Any] = wait_for(check, timeout, "a Ready pod", interval=0.5)
    return found


def _metrics(pod: dict[str, Any]) -> dict[str, float]:
    """The pod's /metrics (from the host: pod IPs are routed to the bridge)."""
    port = next(
        p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "http"
    )
    url = f"http://{pod['status']['podIP']}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def _wait_metric(pod: dict[str, Any], name: str, at_least: float, timeout: float) -> float:
    def check() -> float | None:
        try:
            value = _metrics(pod).get(name, 0.0)
        except (OSError, urllib.error.URLError):
            return None
        return value if value >= at_least else None

    try:
        found: float = wait_for(check, timeout, f"{name} >= {at_least}", interval=0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}; last /metrics value: {_metrics(pod).get(name)}") from None
    return found


def _gone(kube: ApiServer, namespace: str, name: str) -> bool:
    return not kube.exists(_path("Pod", namespace, name))


def test_pod_runs_learns_and_resumes_from_its_volume_after_delete(
    kube: ApiServer, node: Node, pod_kafka: KafkaBroker, tmp_path: Path
) -> None:
    bootstrap = pod_kafka.bootstrap_servers
    ds = get_dataset(DATASET)
    topic = unique(DATASET)
    dead_letter, versions_topic = f"{topic}.dlq", f"{topic}.versions"
    topics = {"input": [topic], "dead_letter": dead_letter, "versions": versions_topic}
    create_topics(bootstrap, {topic: 1, dead_letter: 1, versions_topic: 1}, 30.0)
    group = unique("group")

    namespace = "st-node"
    make_namespace(kube, namespace)  # Pod Security `restricted` enforced
    _create(kube, _path("Secret", namespace), {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stream-trainer-checkpoint-key"},
        "stringData": {"hmac-key": HMAC_KEY},  # the key name the chart reads
    })  # fmt: skip
    # The volume: a hostPath PersistentVolume (no class) for the chart's claim to bind.
    volume = node.workdir / "pv-stream-trainer"
    volume.mkdir()
    os.chown(volume, UID, UID)
    kube.request("POST", "/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-data"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "hostPath": {"path": str(volume), "type": "Directory"}},
    })  # fmt: skip
    host_config = {
        "kafka": {"bootstrap_servers": bootstrap},
        "topics": topics,
        "checkpoint": {"dir": str(volume / "checkpoints")},
    }
    values = {
        "image": {"repository": "stream-trainer", "tag": "test", "pullPolicy": "Never"},
        "persistence": {"storageClass": "-", "size": "1Gi"},
        # Two shared cores: what the scheduler reserves must fit beside the test run.
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "config": {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": group,
                      "session_timeout_ms": 6000, "heartbeat_interval_ms": 500},
            "topics": topics,
            "record": {"features": list(ds.features), "features_field": None,
                       "labels": list(ds.labels or ())},
            "checkpoint": {"every_seconds": 1},
            "registry": {"publish_every_records": 400},
        },
    }  # fmt: skip
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))  # JSON is YAML
    produce_records(host_config, FIRST, 1, dataset=DATASET)

    started = time.monotonic()
    kube.helm("install", RELEASE, str(CHART_DIR), "-n", namespace, "-f", str(values_file))
    first = _ready_pod(kube, namespace, "", 300)
    ready_s = time.monotonic() - started
    claim = kube.request("GET", _path("PersistentVolumeClaim", namespace, FULLNAME)).body
    assert claim["spec"]["volumeName"] == f"{namespace}-data"
    learnt_first = _wait_metric(first, LEARNT, FIRST, 120)
    _wait_metric(first, PUBLISHED, 1, 60)
    ends = end_offsets(bootstrap, topic)
    wait_for(lambda: covers(manifest_offsets(host_config), ends), 60, "a checkpoint")

    # `kubectl delete pod`: the ReplicaSet makes a new pod on the same claim at once,
    # while the old one still shuts down (final checkpoint and commit). The new records
    # arrive once the old pod is gone, so every one of them is the new pod's to learn.
    name, uid = first["metadata"]["name"], first["metadata"]["uid"]
    deleted = time.monotonic()
    kube.request("DELETE", _path("Pod", namespace, name))
    wait_for(lambda: _gone(kube, namespace, name), 120, f"pod {name} gone", interval=0.5)
    gone_s = time.monotonic() - deleted
    produce_records(host_config, SECOND, 1, seed=7, dataset=DATASET)
    ends = end_offsets(bootstrap, topic)
    second = _ready_pod(kube, namespace, uid, 300)
    replaced_s = time.monotonic() - deleted
    wait_for(lambda: covers(manifest_offsets(host_config), ends), 120, "the new records")
    learnt_second = _wait_metric(second, LEARNT, SECOND, 60)

    started = time.monotonic()
    tested = kube.helm("test", RELEASE, "-n", namespace, check=False)
    test_s = time.monotonic() - started

    # Stop the pod (uninstall keeps the claim) before the ledger is read.
    kube.helm("uninstall", RELEASE, "-n", namespace)
    wait_for(lambda: not _pods(kube, namespace), 120, "pods gone after uninstall")
    produced = sum(ends.values())
    relearnt = int(learnt_first + learnt_second) - produced
    verdict = judge([load_final(host_config).state], ends)
    committed = committed_offsets(bootstrap, group, list(ends))
    versions = read_topic(bootstrap, versions_topic)
    print(
        f"\nkube node: pod Ready {ready_s:.1f} s after helm install; learnt {int(learnt_first)}"
        f"+{int(learnt_second)} of {produced} produced, versions published {len(versions)}; "
        f"`delete pod`: old pod gone in {gone_s:.1f} s, new pod Ready {replaced_s:.1f} s "
        f"after the delete, relearnt {relearnt}; "
        f"ledger: {verdict.line()}; committed {committed} vs ends {ends}; "
        f"helm test exit {tested.returncode} in {test_s:.1f} s",
        file=sys.stderr,
    )
    assert learnt_first == FIRST
    assert versions, "no version event on the versions topic"
    assert relearnt == 0 and learnt_second == SECOND
    assert verdict.lost == 0 and verdict.twice == 0
    assert verdict.records_learnt == produced  # one model learnt both pods' records
    assert committed == ends
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # It went through the Service's name (DNS stand-in -> ClusterIP -> kube-proxy).
    assert node.dns is not None
    assert f"{FULLNAME}.{namespace}.svc.cluster.local" in node.dns.queries
