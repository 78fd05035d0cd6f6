"""The chart-to-``docker run`` translation the container test relies on, without Docker.

These run everywhere (no daemon needed): they show that the flags follow the rendered
chart, so a chart change shows up in how the image is run instead of being ignored.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest

from tests.chart.test_chart import CHART_DIR, Rendered
from tests.container.test_image import PodAsDocker


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def _pod(chart: helm.Chart, tmp_path: Path, values: dict[str, object]) -> PodAsDocker:
    rendered = Rendered(chart, {"secrets": {"checkpointKey": {"as": "env"}}, **values})
    claim = rendered.one("PersistentVolumeClaim")["metadata"]["name"]
    ck = rendered.values["secrets"]["checkpointKey"]
    return PodAsDocker(
        rendered,
        tmp_path,
        secrets={(ck["existingSecret"], ck["key"]): "k"},
        claims={claim: tmp_path / "volume"},
    )


def _pairs(args: list[str]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(args))


def test_default_chart_runs_hardened(chart: helm.Chart, tmp_path: Path) -> None:
    pod = _pod(chart, tmp_path, {})
    pairs = _pairs(pod.args)
    assert ("--user", "10001:10001") in pairs
    assert "--read-only" in pod.args
    assert ("--cap-drop", "ALL") in pairs
    assert ("--security-opt", "no-new-privileges") in pairs
    assert ("--tmpfs", "/tmp:rw,mode=1777,size=256m") in pairs
    assert ("--memory", "2g") in pairs
    config = tmp_path / "configmap-config" / "config.yaml"
    assert ("-v", f"{config}:/etc/stream-trainer/config.yaml:ro") in pairs
    assert ("-v", f"{tmp_path / 'volume'}:/data") in pairs
    assert pod.env["STREAM_TRAINER_CHECKPOINT__HMAC_KEY"] == "k"
    assert "k" not in pod.args  # the key reaches docker through its environment only
    assert pod.command == ["run", "--config", "/etc/stream-trainer/config.yaml"]
    assert pod.grace == 40  # ceil(shutdown.timeout_s 25) + margin 15


def test_flags_follow_chart_values(chart: helm.Chart, tmp_path: Path) -> None:
    pod = _pod(
        chart,
        tmp_path,
        {
            "securityContext": {"readOnlyRootFilesystem": False},
            "tmpSizeLimit": "64Mi",
            "terminationGracePeriodSeconds": 90,
            "config": {"http": {"port": 9200}},
        },
    )
    assert "--read-only" not in pod.args
    assert ("--tmpfs", "/tmp:rw,mode=1777,size=64m") in _pairs(pod.args)
    assert pod.grace == 90
    assert pod.port == 9200
