"""Search Jobs against a real kube-apiserver (RBAC on, Pod Security ``restricted``).

The chart is installed with ``search.jobs`` (ci/search-jobs-values.yaml). The service's own
client (:class:`stream_trainer.training.search.kube_jobs.KubeApi`), authenticated as the chart's
ServiceAccount with a token from the TokenRequest API (what the kubelet mounts in the pod),
creates the Job made from the installed template, reads and deletes it; the same token is
refused everything else. No kubelet: the Job's pods never run here
(tests/integration/test_search_jobs.py runs its command as local processes).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from stream_trainer.publishing.registry import ModelRegistry
from stream_trainer.training.search.kube_jobs import (
    RUNNING,
    STUDY_LABEL,
    KubeApi,
    job_manifest,
    job_state,
)
from tests.conftest import BrokerHandle
from tests.harness import HMAC_KEY, ServiceProcess, service_config, wait_for
from tests.integration.test_training import encoded_rows, produce_values, stop_cleanly
from tests.kube.kube_env import ApiServer
from tests.kube.test_helm_install import (
    CHART_DIR,
    FULLNAME,
    RELEASE,
    dry_run_pod,
    make_namespace,
    make_prerequisites,
)
from tests.postgres_env import Postgres

pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

CASE = "search-jobs-values.yaml"
PUBLISHED = "stream_trainer_versions_published_total"


def _service_account_token(kube: ApiServer, namespace: str, account: str) -> str:
    answer = kube.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"expirationSeconds": 3600}},
    )  # fmt: skip
    token: str = answer.body["status"]["token"]
    return token


@pytest.fixture(scope="module")
def installed(kube: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    namespace = make_namespace(kube, "st-search-job-rbac")  # not test_helm_install's
    make_prerequisites(kube, namespace, CASE)
    kube.helm(
        "install", RELEASE, str(CHART_DIR), "-n", namespace, "-f", str(CHART_DIR / "ci" / CASE)
    )
    token_file = tmp_path_factory.mktemp("sa") / "token"
    token_file.write_text(_service_account_token(kube, namespace, FULLNAME), encoding="utf-8")
    api = KubeApi(
        url=kube.url, namespace=namespace, token_file=token_file, ca_file=kube.pki / "ca.crt"
    )
    config_map = kube.request(
        "GET", f"/api/v1/namespaces/{namespace}/configmaps/{FULLNAME}-search-job"
    ).body
    template = yaml.safe_load(config_map["data"]["search-job.yaml"])
    return {"namespace": namespace, "api": api, "template": template, "token_file": token_file}


def _pod_of(job: dict[str, Any], name: str) -> dict[str, Any]:
    template = job["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }


def test_the_rendered_template_is_accepted_as_is(
    kube: ApiServer, installed: dict[str, Any]
) -> None:
    namespace = installed["namespace"]
    answer = kube.request(
        "POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", installed["template"],
        params={"dryRun": "All", "fieldValidation": "Strict"},
    )  # fmt: skip
    assert answer.status == 201
    assert answer.warnings == []


def test_the_service_account_creates_gets_and_deletes_the_search_job(
    kube: ApiServer, installed: dict[str, Any]
) -> None:
    api: KubeApi = installed["api"]
    namespace = installed["namespace"]
    name = f"{FULLNAME}-search-0123456789-abc"
    snapshot = Path("/var/lib/stream-trainer/search-snapshots/window-" + "ab" * 32 + ".snap")
    job = job_manifest(installed["template"], name, name, snapshot, 3)
    started = time.monotonic()
    created = api.create_job(job)
    create_s = time.monotonic() - started
    assert created["metadata"]["name"] == name
    stored = api.get_job(name)
    assert stored is not None
    assert job_state(stored) == RUNNING  # no controller here: nothing ran, nothing failed
    spec = stored["spec"]
    assert (spec["completionMode"], spec["parallelism"], spec["completions"]) == ("Indexed", 3, 3)
    assert stored["metadata"]["labels"][STUDY_LABEL] == name
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert args[-4:] == ["--study", name, "--snapshot", str(snapshot)]
    # What its pods would be passes Pod Security "restricted" (enforced in this namespace).
    assert dry_run_pod(kube, namespace, _pod_of(stored, f"{name}-0")) == []
    api.delete_job(name)
    assert api.get_job(name) is None
    api.delete_job(name)  # deleting a missing Job is fine: the retrain cleans up twice
    print(
        f"\nkube search job: created by the service account in {create_s:.3f} s, "
        f"restricted-ok, deleted",
        file=sys.stderr,
    )


def _as_account(kube: ApiServer, token_file: Path, method: str, path: str, body: Any = None) -> int:
    with httpx2.Client(
        base_url=kube.url,
        headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
        verify=ssl.create_default_context(cafile=str(kube.pki / "ca.crt")),
        trust_env=False,
    ) as client:
        return client.request(method, path, content=None if body is None else json.dumps(body),
                              headers={"Content-Type": "application/json"}).status_code  # fmt: skip


def test_the_service_account_may_do_nothing_else(
    kube: ApiServer, installed: dict[str, Any]
) -> None:
    namespace, token_file = installed["namespace"], installed["token_file"]
    job = job_manifest(installed["template"], "other", "other", Path("/x"), 1)
    job["metadata"].pop("namespace", None)
    refused = {
        "list jobs": ("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs", None),
        "patch a job": ("PUT", f"/apis/batch/v1/namespaces/{namespace}/jobs/other", job),
        "read secrets": ("GET", f"/api/v1/namespaces/{namespace}/secrets", None),
        "create pods": ("POST", f"/api/v1/namespaces/{namespace}/pods",
                        _pod_of(job, "direct")),
        "jobs elsewhere": ("POST", "/apis/batch/v1/namespaces/default/jobs", job),
        "cronjobs": ("POST", f"/apis/batch/v1/namespaces/{namespace}/cronjobs", job),
        "read configmaps": ("GET", f"/api/v1/namespaces/{namespace}/configmaps", None),
    }  # fmt: skip
    answers = {
        what: _as_account(kube, token_file, method, path, body)
        for what, (method, path, body) in refused.items()
    }
    assert answers == dict.fromkeys(refused, 403)
    # Control: the same token may create a Job here (so the 403s are RBAC, not the token).
    assert (
        _as_account(
            kube, token_file, "POST", f"/apis/batch/v1/namespaces/{namespace}/jobs?dryRun=All", job
        )
        == 201
    )


# -- the whole flow: the service creates the Job, its pods' command runs here ---------------

WINDOW = 2000
TRIALS = 10
WORKERS = 2


def _wait_for_job(kube: ApiServer, namespace: str, timeout: float) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        items = kube.request(
            "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs",
            params={"labelSelector": STUDY_LABEL},
        ).body["items"]  # fmt: skip
        return items[0] if items else None

    job: dict[str, Any] = wait_for(found, timeout=timeout, what="the service's search Job")
    return job


@pytest.mark.integration
def test_the_service_runs_its_search_as_a_job_and_publishes_the_winner_through_the_gate(
    kube: ApiServer,
    installed: dict[str, Any],
    tansu_broker: BrokerHandle,
    postgres: Postgres,
    tmp_path: Path,
) -> None:
    namespace = installed["namespace"]
    bootstrap = tansu_broker.bootstrap_servers
    template_file = tmp_path / "search-job.yaml"  # the installed template, as the pod mounts it
    template_file.write_text(yaml.safe_dump(installed["template"]), encoding="utf-8")
    url = postgres.new_database()
    config = service_config(
        tmp_path,
        bootstrap,
        "bananas",
        "full_batch",
        overrides={
            "model": {
                "preprocessing": [],
                "learner": {
                    "path": "sklearn.tree.DecisionTreeClassifier",
                    "params": {"max_depth": 1, "random_state": 0},
                },
            },
            "training": {
                "full_batch": {
                    "window_records": WINDOW,
                    "retrain_every_records": WINDOW,
                    "retrain_on_drift": False,
                    "search": {
                        "enabled": True,
                        "algorithm": "tpe",
                        "space": {"learner.max_depth": {"type": "int", "low": 1, "high": 12}},
                        "trials": TRIALS,
                        "validation_fraction": 0.25,
                        "jobs": {
                            "enabled": True,
                            "parallelism": WORKERS,
                            "snapshot_dir": str(tmp_path / "snapshots"),
                            "job_template": str(template_file),
                            "api_server": kube.url,
                            "namespace": namespace,
                            "token_file": str(installed["token_file"]),
                            "ca_file": str(kube.pki / "ca.crt"),
                            "poll_interval_s": 0.2,
                            "wait_timeout_s": 240,
                        },
                    },
                }
            },
        },
    )
    values = encoded_rows("bananas", WINDOW)
    began = time.monotonic()
    with ServiceProcess(
        config, tmp_path, name="jobs", env={"STREAM_TRAINER_SEARCH_DATABASE_URL": url}
    ) as service:
        produce_values(bootstrap, config["topics"]["input"][0], [(0, v) for v in values])
        job = _wait_for_job(kube, namespace, timeout=120)
        created_s = time.monotonic() - began
        # The Job's pods, as local processes: the Job's args and env; the mounts' stand-ins
        # are the service's config file, and the Secrets' values as env / a file.
        (container,) = job["spec"]["template"]["spec"]["containers"]
        args = [str(service.config_path) if a.startswith("/etc/") else a for a in container["args"]]
        url_file = tmp_path / "db-url"
        url_file.write_text(url, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_TRAINER_")}
        for item in container["env"]:
            env[item["name"]] = item["value"]
        env.update(
            STREAM_TRAINER_SEARCH_DATABASE_URL_FILE=str(url_file),
            STREAM_TRAINER_CHECKPOINT__HMAC_KEY=HMAC_KEY,
            TMPDIR=str(tmp_path),
        )
        pods = [
            subprocess.Popen(
                [sys.executable, "-m", "stream_trainer", *args],
                env={**env, "JOB_COMPLETION_INDEX": str(index)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index in range(job["spec"]["parallelism"])
        ]
        for pod in pods:
            out, err = pod.communicate(timeout=300)
            assert pod.returncode == 0, err[-3000:]
            assert postgres.password not in out + err
        service.wait_metric(PUBLISHED, 1, timeout=120)
        complete = service.metric('stream_trainer_search_trials_total{state="complete"}')
        metrics_text = json.dumps(service.metrics())
        stop_cleanly(service)
    registry = ModelRegistry(
        Path(config["registry"]["root"]), config["model"]["name"], HMAC_KEY.encode(), keep_last=9
    )
    (version,) = registry.list()
    search = version.metadata["search"]
    print(
        f"\nkube search job end to end: Job created {created_s:.1f} s after the service started; "
        f"{search['counts']} by {search['job']['trials_by_worker']}; baseline "
        f"{search['baseline_score']:.3f}, best {search['best']['score']:.3f} "
        f"(max_depth {search['best']['params']['learner.max_depth']}); search "
        f"{search['duration_s']:.1f} s; published {time.monotonic() - began:.1f} s after start",
        file=sys.stderr,
    )
    assert search["job"]["name"] == job["metadata"]["name"]
    assert search["job"]["parallelism"] == WORKERS
    assert search["counts"] == {"complete": TRIALS, "failed": 0, "pruned": 0}
    assert len(search["job"]["trials_by_worker"]) == WORKERS
    assert complete == TRIALS
    assert search["best"]["score"] > search["baseline_score"] + 0.2
    assert search["gate"]["accepted"] is True
    assert (
        version.metadata["learner"]["params"]["max_depth"]
        == (search["best"]["params"]["learner.max_depth"])
    )
    # The database password is nowhere the service writes: checkpoints, versions, its log,
    # metrics, the Job it created (only the URL file standing in for the Secret holds it).
    secret = postgres.password.encode()
    leaks = [
        p for p in tmp_path.rglob("*") if p.is_file() and p != url_file and secret in p.read_bytes()
    ]
    assert leaks == []
    assert postgres.password not in metrics_text + json.dumps(job)
    # The service deleted its Job, and the snapshot (the window) is gone from the volume.
    assert not kube.exists(f"/apis/batch/v1/namespaces/{namespace}/jobs/{job['metadata']['name']}")
    assert list((tmp_path / "snapshots").iterdir()) == []
