"""Session fixture ``images``: a private Docker daemon and the built images.

Registered for the whole suite by tests/conftest.py (``pytest_plugins``) so that the
container tests and the single-node cluster tests (tests/kube) share ONE daemon: a
second daemon on the same cache folder is refused by its lock.

Availability rule, as for the brokers (tests/conftest.py): a daemon or build that fails
makes these tests FAIL when ``CI=true`` (with the reason) and SKIP otherwise. The daemon
starts once per session, on first use, and is stopped (by pid) at session end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.container.docker_env import PROJECT_IMAGE, DockerEnv, DockerEnvError

DEMO_IMAGE = "stream-trainer:test-demo"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@dataclass
class Images:
    """The daemon and the two targets built from the Dockerfile."""

    env: DockerEnv
    runtime: str
    demo: str


@pytest.fixture(scope="session")
def images() -> Iterator[Images]:
    """Start the daemon, build the bases (cached) and both targets; stop it at the end."""
    env = DockerEnv(log=sys.stderr)
    try:
        env.start()
        runtime = env.project_image(PROJECT_IMAGE)
        demo = env.project_image(DEMO_IMAGE, target="demo")
    except (DockerEnvError, OSError) as error:
        env.stop()
        reason = f"docker image unavailable: {error}"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    print(f"\ndocker: {env.timings.summary()}", file=sys.stderr)
    try:
        yield Images(env, runtime, demo)
    finally:
        env.stop()
