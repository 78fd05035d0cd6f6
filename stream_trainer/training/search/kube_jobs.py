"""The few Kubernetes API calls a distributed search makes: create, get and delete a Job.

Plain REST with httpx2 and the pod's service-account token (re-read at every call: the
kubelet rotates it) and CA. The chart's Role grants exactly these verbs on ``jobs`` in the
service's namespace; nothing else is called.
"""

from __future__ import annotations

import copy
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_trainer.errors import StreamTrainerError

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
STUDY_LABEL = "stream-trainer.io/study"
# A Job's name becomes a label value (batch.kubernetes.io/job-name) and, with "-<index>",
# each Indexed Job pod's hostname: keep it well inside 63 characters.
MAX_NAME = 52
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"


class KubeApiError(StreamTrainerError):
    """The API server refused a call or could not be reached; the message says which."""


def in_cluster_url(environ: dict[str, str] | None = None) -> str:
    """The API server's URL from the variables Kubernetes sets in every pod."""
    env = dict(os.environ) if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT_HTTPS")
    port = port or env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeApiError(
            "not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST): set "
            "training.full_batch.search.jobs.api_server"
        )
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"https://{host}:{port}"


@dataclass
class KubeApi:
    """Jobs in one namespace, as the service account ``token_file`` is allowed to."""

    url: str
    namespace: str
    token_file: Path
    ca_file: Path
    timeout_s: float = 30.0

    def _client(self) -> Any:
        import httpx2  # noqa: PLC0415  (only a Job search needs it)

        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
            context = ssl.create_default_context(cafile=str(self.ca_file))
        except OSError as error:
            raise KubeApiError(f"service account credentials unreadable: {error}") from error
        return httpx2.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            verify=context,
            timeout=self.timeout_s,
            trust_env=False,
        )

    def _call(self, method: str, path: str, body: Any = None, allow: tuple[int, ...] = ()) -> Any:
        import httpx2  # noqa: PLC0415

        full = f"/apis/batch/v1/namespaces/{self.namespace}/jobs{path}"
        try:
            with self._client() as client:
                response = client.request(method, full, json=body)
        except httpx2.HTTPError as error:
            raise KubeApiError(f"{method} {full}: {type(error).__name__}: {error}") from error
        if response.status_code in allow:
            return None
        if response.status_code >= 400:
            raise KubeApiError(
                f"{method} {full}: HTTP {response.status_code}: {_message(response)}"
            )
        return response.json()

    def create_job(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the Job; returns the created object."""
        created: dict[str, Any] = self._call("POST", "", manifest)
        return created

    def get_job(self, name: str) -> dict[str, Any] | None:
        """The Job, or None when it does not exist."""
        job: dict[str, Any] | None = self._call("GET", f"/{name}", allow=(404,))
        return job

    def delete_job(self, name: str) -> None:
        """Delete the Job and its pods (background propagation); a missing Job is fine."""
        self._call(
            "DELETE",
            f"/{name}",
            {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            allow=(404,),
        )


def _message(response: Any) -> str:
    try:
        return str(response.json().get("message", response.text))[:500]
    except ValueError:
        return str(response.text)[:500]


def namespace_of_pod(path: Path = NAMESPACE_FILE) -> str:
    """The namespace of the pod's service account."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise KubeApiError(
            f"no namespace given and {path} unreadable ({error.strerror}): set "
            "training.full_batch.search.jobs.namespace"
        ) from error


def job_state(job: dict[str, Any] | None) -> str:
    """``running``, ``succeeded`` or ``failed`` from the Job's conditions (a missing Job
    counts as failed: someone deleted it)."""
    if job is None:
        return FAILED
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return SUCCEEDED
        if condition.get("type") == "Failed":
            return FAILED
    return RUNNING


def job_name(prefix: str, suffix: str) -> str:
    """A DNS-1123 Job name ``<prefix>-<suffix>`` of at most MAX_NAME characters."""
    suffix = _DNS_LABEL.sub("-", suffix.lower()).strip("-")
    prefix = _DNS_LABEL.sub("-", prefix.lower()).strip("-")[: MAX_NAME - len(suffix) - 1]
    return f"{prefix.rstrip('-')}-{suffix}"


def job_manifest(
    template: dict[str, Any], name: str, study: str, snapshot: Path, parallelism: int
) -> dict[str, Any]:
    """The chart's Job template made into one search's Job: its name, the study label,
    ``parallelism`` pods (and as many completions, Indexed), and ``--study`` /
    ``--snapshot`` appended to the first container's arguments."""
    job = copy.deepcopy(template)
    if job.get("kind") != "Job" or not job.get("spec", {}).get("template"):
        raise KubeApiError("the search Job template is not a Job manifest")
    metadata = job.setdefault("metadata", {})
    metadata.pop("generateName", None)
    metadata["name"] = name
    metadata.setdefault("labels", {})[STUDY_LABEL] = study
    spec = job["spec"]
    spec.update(parallelism=parallelism, completions=parallelism, completionMode="Indexed")
    pod = spec["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {})[STUDY_LABEL] = study
    container = pod["spec"]["containers"][0]
    container["args"] = [
        *container.get("args", []),
        "--study",
        study,
        "--snapshot",
        str(snapshot),
    ]
    return job
