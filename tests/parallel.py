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

pytest-xdist 3.8 tells its scheduler a test's group by appending ``@<group>`` to the nodeid
on the worker, through ``item._nodeid``; pytest 9.2 keeps the nodeid in ``item._id``
instead, so the append is lost and the groups are silently ignored (pytest-xdist issue
#1386). :func:`pytest_collection_modifyitems_group_suffix` redoes it where it was lost, and
does nothing where xdist's own append worked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_group_suffix(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """On a ``--dist loadgroup`` worker, after xdist's hook: give each grouped test the
    ``@<group>`` nodeid suffix xdist's scheduler groups by, where xdist's append was lost."""
    if not config.getoption("loadgroup", default=False):
        return  # not an xdist worker of a loadgroup run
    for item in items:
        names = sorted(
            {_group_name(mark.args, mark.kwargs) for mark in item.iter_markers("xdist_group")}
        )
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            _set_nodeid(item, item.nodeid + suffix)


def _group_name(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The group an ``xdist_group`` mark names, as xdist reads it."""
    return str(args[0] if args else kwargs.get("name", "default"))


def _set_nodeid(item: pytest.Item, nodeid: str) -> None:
    """Replace the item's nodeid: pytest >= 9.2 keeps it structured in ``_id``."""
    current = getattr(item, "_id", None)
    if current is not None and not isinstance(current, str):
        item._id = type(current).parse(nodeid)  # type: ignore[attr-defined]
    else:
        item._nodeid = nodeid  # type: ignore[attr-defined]
