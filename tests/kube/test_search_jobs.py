"""Search Jobs against a real kube-apiserver (RBAC on, Pod Security ``restricted``).

The chart is installed with ``search.jobs`` (ci/search-jobs-values.yaml). The service's own
client (:class:`stream_trainer.kube_jobs.KubeApi`), authenticated as the chart's
ServiceAccount with a token from the TokenRequest API (what the kubelet mounts in the pod),
creates the Job made from the installed template, reads and deletes it; the same token is
refused everything else. No kubelet: the Job's pods never run here
(tests/integration/test_search_jobs.py runs its command as local processes).
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from stream_trainer.kube_jobs import RUNNING, STUDY_LABEL, KubeApi, job_manifest, job_state
from tests.kube.kube_env import ApiServer
from tests.kube.test_helm_install import (
    CHART_DIR,
    FULLNAME,
    RELEASE,
    dry_run_pod,
    make_namespace,
    make_prerequisites,
)

pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

CASE = "search-jobs-values.yaml"


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
    namespace = make_namespace(kube, "st-search-jobs")
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
