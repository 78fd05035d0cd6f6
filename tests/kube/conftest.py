"""Session fixture of the API-server tests: etcd + kube-apiserver, and the real helm CLI.

The ``node`` fixture adds a single node that runs pods (tests/kube/node_env.py) with the
project image imported from the container tests' Docker daemon (``images``).

Availability rule, as for the brokers and the Docker daemon: when the binaries cannot be
built or the server cannot start, these tests FAIL under ``CI=true`` (with the reason)
and SKIP elsewhere. The server starts once per session, on first use, and is stopped by
pid at session end (its etcd data is a temporary folder, removed with it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from stream_trainer.testing.kafka_broker import KafkaBroker
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.container.fixtures import Images
from tests.kube.kube_env import ApiServer, BuildTimings, KubeEnvError, build
from tests.kube.node_env import Node, host_address

S = TypeVar("S")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def kube() -> Iterator[ApiServer]:
    """A ready API server (admin kubeconfig in ``.kubeconfig``); stopped at the end."""
    timings = BuildTimings()
    started = time.monotonic()
    server: ApiServer | None = None
    try:
        tools = build(timings, log=sys.stderr)
        server = ApiServer(tools, log=sys.stderr)
        server.start()
    except (KubeEnvError, OSError) as error:
        if server is not None:
            server.stop()
        reason = f"kube-apiserver unavailable: {error}"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    print(
        f"\nkube: build {timings.summary()}; etcd + kube-apiserver ready in "
        f"{server.start_seconds:.1f} s (fixture {time.monotonic() - started:.1f} s)",
        file=sys.stderr,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def node(kube: ApiServer, images: Images) -> Iterator[Node]:
    """A Ready node (containerd + kubelet + scheduler + controller-manager) for ``kube``,
    with the project image imported; every pod deleted and everything stopped at the end."""
    started = time.monotonic()
    node: Node | None = None
    try:
        node = Node(kube.tools, kube, log=sys.stderr)
        node.start()
        imported = time.monotonic()
        node.import_docker_image(images.env, images.runtime)
        import_s = time.monotonic() - imported
    except (KubeEnvError, OSError) as error:
        if node is not None:
            node.stop()
        reason = f"single-node cluster unavailable: {error}"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    print(
        f"\nkube node: Ready in {node.start_seconds:.1f} s, {images.runtime} imported into "
        f"containerd in {import_s:.1f} s (fixture {time.monotonic() - started:.1f} s)",
        file=sys.stderr,
    )
    try:
        yield node
    finally:
        node.stop()


def _reachable_from_pods(
    what: str, make: Callable[[str], S], start: Callable[[S], object], close: Callable[[S], object]
) -> Iterator[S]:
    """``make(host_address())`` started, closed at the end: a server the node's pods reach
    (their loopback is their own). Fails under CI, skips elsewhere, when it cannot start."""
    server: S | None = None
    try:
        server = make(host_address())
        start(server)
    except Exception as error:  # any start failure: fail in CI, else skip
        if server is not None:
            close(server)
        reason = f"{what} on the host's address unavailable: {error}"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        yield server
    finally:
        close(server)


@pytest.fixture(scope="session")
def pod_kafka() -> Iterator[KafkaBroker]:
    """Apache Kafka on the host's primary address, for the pods of the node tests."""
    yield from _reachable_from_pods(
        "Kafka", lambda host: KafkaBroker(host=host), KafkaBroker.start, KafkaBroker.close
    )


@pytest.fixture(scope="session")
def pod_s3() -> Iterator[SeaweedFS]:
    """SeaweedFS (S3) on the host's primary address, for the pods of the node tests."""
    yield from _reachable_from_pods(
        "SeaweedFS", lambda host: SeaweedFS(host=host), SeaweedFS.start, SeaweedFS.close
    )
