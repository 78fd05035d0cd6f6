"""Which tests share one pytest-xdist worker (``make test`` runs ``-n 2 --dist loadgroup``).

Session fixtures run once PER WORKER. Most servers are private to their session (free
loopback ports, temporary folders: Kafka, Tansu, Apicurio, SeaweedFS, MLflow, PostgreSQL,
the kube-apiserver), so each worker simply starts its own. A few are one per MACHINE:

- ``images``: the private dockerd runs on the fixed cache folder
  ``~/.cache/stream-trainer/docker`` (data root, socket, pid file) under an exclusive lock;
  a second worker's daemon would be refused ("in use by another session").
- ``node``: the kubelet's fixed host paths (/var/lib/kubelet, /var/lib/cni), the bridge
  ``st-cni0`` on 10.244.0.0/24 and kube-proxy's iptables chains exist once per host.
- ``kube``: not a singleton itself (free ports, a temporary etcd), but ``node`` needs the
  session's API server; grouping its other users with it starts one etcd + kube-apiserver
  instead of one per worker.

Every test that uses one of these fixtures (directly or through another fixture) gets
``xdist_group(HOST_GROUP)``, so ``--dist loadgroup`` runs them all, in order, on ONE worker.
Selected by fixture rather than by folder, so a new test elsewhere that asks for ``images``
is grouped too. Serial runs (``-n 0``, or no xdist) ignore the mark.
"""

from __future__ import annotations

import pytest

HOST_GROUP = "host-singletons"
# The fixtures whose servers must exist at most once per machine (see the module doc).
HOST_FIXTURES = frozenset({"images", "node", "kube"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the users of a per-machine fixture. ``tryfirst``: xdist's worker reads the
    ``xdist_group`` marks in its own hook of the same name, which must see ours."""
    for item in items:
        if HOST_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(HOST_GROUP))
