"""The chart's partition scope run for real: two pods of the image share a topic's
partitions through Kafka's group protocol, keep their state in S3, and hand a deleted
pod's partitions over with nothing lost and nothing learnt twice.

The single node (tests/kube/node_env.py) runs the Deployment that ``helm install`` makes
with ``replicaCount: 2``, ``model.scope: partition`` and both stores on SeaweedFS: no
claim, no volume, the S3 keys from the chart's ``secrets.objectStore`` Secret. The learner
is the counting learner (admitted by ``STREAM_TRAINER_TESTING_LEARNERS=1`` through the
chart's ``extraEnv``), whose state is the multiset of (partition, offset, key) it learnt:
the oracle reads those from each slot's checkpoint in the bucket and compares them with
what the broker holds, not with the service's ledger. The pods' own per-partition counters
show which pod learnt what.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.laptop.embedded import create_topics
from stream_trainer.testing.counting import (
    FEATURES,
    RIVER_PATH,
    CountingProducer,
    combined_counts,
    judge_counts,
    produced_samples,
    read_slots,
)
from stream_trainer.testing.kafka_broker import KafkaBroker
from stream_trainer.testing.seaweedfs import SeaweedFS
from stream_trainer.training.learners import TESTING_ENV
from tests.faults.support import committed_offsets, end_offsets
from tests.harness import HMAC_KEY, unique, wait_for
from tests.kube.kube_env import ApiServer
from tests.kube.node_env import Node
from tests.kube.test_helm_install import CHART_DIR, RELEASE, _create, _path, make_namespace
from tests.kube.test_node import _gone, _pods, _ready

pytestmark = [pytest.mark.kube, pytest.mark.container, pytest.mark.timeout(1800)]

PARTITIONS = 4
FIRST, SECOND = 800, 400  # records while both pods run, and after one is deleted
SLOTS = "stream_trainer_slots"
SLOT_LEARNT = "stream_trainer_slot_records_learnt_total"


def _samples(pod: dict[str, Any], name: str) -> dict[str, float]:
    """One metric of the pod's /metrics, by its labels rendered ``k=v,...`` ({} while the
    pod does not answer)."""
    port = next(
        p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "http"
    )
    url = f"http://{pod['status']['podIP']}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[labels] = sample.value
    return found


def _learnt_by_partition(pod: dict[str, Any]) -> dict[int, int]:
    """The pod's records learnt per input partition (its slot counters)."""
    learnt: dict[int, int] = {}
    for labels, value in _samples(pod, SLOT_LEARNT).items():
        fields = dict(item.split("=", 1) for item in labels.split(","))
        learnt[int(fields["partition"])] = int(value)
    return learnt


def _training_slots(pod: dict[str, Any]) -> int:
    return int(_samples(pod, SLOTS).get("state=training", 0))


def _ready_pods(kube: ApiServer, namespace: str, count: int) -> list[dict[str, Any]]:
    """Exactly ``count`` Ready pods, none of them terminating (a bounded wait)."""

    def check() -> list[dict[str, Any]] | None:
        pods = _pods(kube, namespace)
        ready = [p for p in pods if _ready(p)]
        return ready if len(ready) == count == len(pods) else None

    found: list[dict[str, Any]] = wait_for(check, 300, f"{count} Ready pods", interval=0.5)
    return found


def _pod_logs(node: Node, namespace: str, lines: int = 40) -> str:
    """The tail of every container log the kubelet kept for ``namespace``'s pods."""
    tails = []
    for path in sorted((node.workdir / "pod-logs").glob(f"{namespace}_*/*/*.log")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {path.parent.parent.name}\n" + "\n".join(text))
    return "\n".join(tails) or "(no pod logs)"


def _split_evenly(pods: list[dict[str, Any]]) -> bool:
    """Each pod trains its share of the partitions (cooperative-sticky spreads them)."""
    share = PARTITIONS // len(pods)
    return all(_training_slots(p) == share for p in pods)


def test_two_pods_share_the_partitions_and_hand_over_a_deleted_pods_state(
    kube: ApiServer,
    node: Node,
    pod_kafka: KafkaBroker,
    pod_s3: SeaweedFS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bootstrap = pod_kafka.bootstrap_servers
    topic = unique("counting")
    dead_letter, versions_topic = f"{topic}.dlq", f"{topic}.versions"
    create_topics(bootstrap, {topic: PARTITIONS, dead_letter: 1, versions_topic: 1}, 30.0)
    group = unique("group")
    prefix = f"s3://{pod_s3.bucket}/{unique('release')}"
    checkpoints, key_bytes = f"{prefix}/checkpoints", HMAC_KEY.encode()
    object_store = {
        "endpoint_url": pod_s3.endpoint_url,
        "region": pod_s3.region,
        "path_style": True,
    }

    namespace = "st-node-partition"
    make_namespace(kube, namespace)  # Pod Security `restricted` enforced
    _create(kube, _path("Secret", namespace), {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "stream-trainer-checkpoint-key"},
        "stringData": {"hmac-key": HMAC_KEY},
    })  # fmt: skip
    admin = pod_s3.admin
    _create(kube, _path("Secret", namespace), {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s3-keys"},
        "stringData": {"access-key-id": admin.access_key_id,
                       "secret-access-key": admin.secret_access_key},
    })  # fmt: skip
    values = {
        "image": {"repository": "stream-trainer", "tag": "test", "pullPolicy": "Never"},
        "replicaCount": 2,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "secrets": {"objectStore": {"existingSecret": "s3-keys"}},
        "extraEnv": [{"name": TESTING_ENV, "value": "1"}],
        "config": {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": group,
                      "session_timeout_ms": 6000, "heartbeat_interval_ms": 500},
            "topics": {"input": [topic], "dead_letter": dead_letter,
                       "versions": versions_topic, "control": None},
            "record": {"features": list(FEATURES), "labels": None},
            "model": {"task": "regression", "preprocessing": [], "scope": "partition",
                      "learner": {"path": RIVER_PATH}},
            "checkpoint": {"dir": checkpoints, "every_seconds": 0.5},
            "registry": {"root": f"{prefix}/models", "publish_every_records": 100},
            "object_store": object_store,
        },
    }  # fmt: skip
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))  # JSON is YAML

    started = time.monotonic()
    kube.helm("install", RELEASE, str(CHART_DIR), "-n", namespace, "-f", str(values_file))
    pvcs = kube.request("GET", _path("PersistentVolumeClaim", namespace)).body["items"]
    assert pvcs == [], "both stores are in S3: the chart must render no claim"
    pods = _ready_pods(kube, namespace, 2)
    wait_for(lambda: _split_evenly(pods), 180, "two slots training in each pod", interval=0.5)
    settled_s = time.monotonic() - started

    producer = CountingProducer(bootstrap, topic, PARTITIONS, seed=11)
    producer.produce(FIRST)
    ends = end_offsets(bootstrap, topic)

    def learnt_everything(pods: list[dict[str, Any]]) -> bool:
        by_partition: Counter[int] = Counter()
        for pod in pods:
            by_partition.update(_learnt_by_partition(pod))
        return all(by_partition[p] >= ends[(topic, p)] for p in range(PARTITIONS))

    wait_for(lambda: learnt_everything(pods), 120, f"{FIRST} records learnt", interval=0.5)
    before = {p["metadata"]["name"]: _learnt_by_partition(p) for p in pods}
    s3 = ObjectStoreSettings(**object_store)
    for key, value in admin.env().items():
        monkeypatch.setenv(key, value)  # the oracle reads the bucket as the pods do
    claims_before = {k: s.token for k, s in read_slots(checkpoints, key_bytes, s3).items()}

    # `kubectl delete pod` of one member: on SIGTERM it checkpoints and commits its slots
    # and leaves; the other takes them over from S3, then the ReplicaSet's new pod joins
    # and is handed its share. The new records arrive while that happens.
    deleted = pods[0]
    name = deleted["metadata"]["name"]
    began = time.monotonic()
    kube.request("DELETE", _path("Pod", namespace, name))
    producer.produce(SECOND // 2)
    wait_for(lambda: _gone(kube, namespace, name), 120, f"pod {name} gone", interval=0.5)
    gone_s = time.monotonic() - began
    producer.produce(SECOND - SECOND // 2)
    ends = end_offsets(bootstrap, topic)
    after = _ready_pods(kube, namespace, 2)
    wait_for(lambda: _split_evenly(after), 180, "two slots training in each pod again")
    keys = [(topic, p) for p in range(PARTITIONS)]

    def committed_everything() -> bool:
        # The broker's view: a partition's records are learnt and checkpointed when its
        # group offset reaches its end (pods' counters restart with each pod).
        committed = committed_offsets(bootstrap, group, keys)
        return all(committed[key] >= end for key, end in ends.items())

    try:
        wait_for(committed_everything, 120, "the new records committed", interval=0.5)
    except AssertionError as error:
        committed = committed_offsets(bootstrap, group, keys)
        raise AssertionError(
            f"{error}: committed {committed}, ends {ends}\n{_pod_logs(node, namespace)}"
        ) from None
    handed_s = time.monotonic() - began
    later = {p["metadata"]["name"]: _learnt_by_partition(p) for p in after}

    # Stop the pods (final checkpoints and commits) before the slots are read.
    kube.helm("uninstall", RELEASE, "-n", namespace)
    wait_for(lambda: not _pods(kube, namespace), 120, "pods gone after uninstall")

    slots = read_slots(checkpoints, key_bytes, s3)
    produced = produced_samples(bootstrap, topic)
    verdict = judge_counts(produced, combined_counts(s.learnt for s in slots.values()))
    committed = committed_offsets(bootstrap, group, keys)
    moved = {f"{topic}:{p}" for p in before[deleted["metadata"]["name"]]}
    claims = {k: s.token for k, s in slots.items()}
    print(
        f"\nkube node, partition scope: 2 pods training 2 slots each {settled_s:.1f} s after "
        f"helm install; deleted pod gone in {gone_s:.1f} s, slots handed over and the new "
        f"records committed {handed_s:.1f} s after the delete; pods' per-partition counters "
        f"before {before}, after {later}; slot claims {claims_before} -> {claims}; "
        f"oracle: {verdict.line()}; committed {committed} vs ends {ends}",
        file=sys.stderr,
    )
    assert verdict.produced == producer.produced == FIRST + SECOND
    assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0), verdict.examples
    assert all(slot.misplaced() == 0 for slot in slots.values())
    assert committed == ends
    # Each pod learnt its own share, and the deleted pod's slots were claimed anew by the
    # pods that took them over (restored from S3: the oracle would see their records lost
    # had they started afresh).
    for learnt in before.values():
        assert len(learnt) == PARTITIONS // 2, before
    assert len(moved) == PARTITIONS // 2
    assert all(claims[k] > claims_before[k] for k in moved), (claims_before, claims)
