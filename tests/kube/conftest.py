"""Session fixture of the API-server tests: etcd + kube-apiserver, and the real helm CLI.

Availability rule, as for the brokers and the Docker daemon: when the binaries cannot be
built or the server cannot start, these tests FAIL under ``CI=true`` (with the reason)
and SKIP elsewhere. The server starts once per session, on first use, and is stopped by
pid at session end (its etcd data is a temporary folder, removed with it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import pytest

from tests.kube.kube_env import ApiServer, BuildTimings, KubeEnvError, build


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
