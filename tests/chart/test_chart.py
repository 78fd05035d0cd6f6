"""The Helm chart, checked with Helm's own engine (helm-python-sdk) and Kubernetes schemas.

For the default values and every ``ci/*-values.yaml``: strict lint, values against
``values.schema.json``, every rendered manifest valid Kubernetes (kubernetes-validate,
strict), the ConfigMap's config file accepted by the service's own validator, secrets
only as references, the restricted pod-security profile, probes on real endpoints and a
grace period above the service's shutdown bound. Invalid values must be rejected with a
message that names the offending key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

import stream_trainer
from stream_trainer.config import ConfigError, Settings, settings_from_mapping

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "stream-trainer"
KUBE_VERSION = "1.30.0"
RELEASE = "fraud"
NAMESPACE = "ml"
# Custom resources unknown to kubernetes-validate: asserted on directly (and stored by a
# real API server with their CRDs in tests/kube).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
STAND_IN = "stand-in"  # what a Secret would inject; only its presence matters
SECRET_ENV = {
    "STREAM_TRAINER_KAFKA__SASL_PASSWORD",
    "STREAM_TRAINER_CHECKPOINT__HMAC_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
# Config fields the chart owns (set from `secrets`) or forbids (secret values).
CHART_OWNED_FIELDS = {
    "kafka.sasl_password",
    "kafka.sasl_password_file",
    "kafka.ssl_ca_location",
    "kafka.ssl_certificate_location",
    "kafka.ssl_key_location",
    "checkpoint.hmac_key",
    "checkpoint.hmac_key_file",
    # from a Secret through env (valueFrom secretKeyRef): a password never goes into values
    "schema_registry.basic_auth_password",
    # set from `search.jobs`, which also renders the Job template, its mounts and the RBAC
    "training.full_batch.search.jobs.enabled",
    "training.full_batch.search.jobs.parallelism",
    "training.full_batch.search.jobs.snapshot_dir",
    "training.full_batch.search.jobs.job_template",
    "registry.mlflow.token",
    "registry.mlflow.password",
}

CASES = ["default", *sorted(p.name for p in (CHART_DIR / "ci").glob("*-values.yaml"))]


def _case_values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    loaded = yaml.safe_load((CHART_DIR / "ci" / case).read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


class Rendered:
    """The parsed manifests of one render, with lookups by kind."""

    def __init__(self, chart: helm.Chart, values: dict[str, Any]) -> None:
        self.values = chart.merge_values(values)
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        self.docs: list[dict[str, Any]] = []
        for path, text in sorted(files.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            self.docs.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def workload(self) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")]
        assert len(found) == 1
        return found[0]

    @property
    def pod_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.workload["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod_spec["containers"]
        assert len(containers) == 1
        return dict(containers[0])

    @property
    def config_map(self) -> dict[str, Any]:
        found = [d for d in self.of_kind("ConfigMap") if "config.yaml" in d.get("data", {})]
        assert len(found) == 1
        return found[0]

    @property
    def config(self) -> dict[str, Any]:
        loaded = yaml.safe_load(self.config_map["data"]["config.yaml"])
        assert isinstance(loaded, dict)
        return loaded

    @property
    def search_jobs(self) -> list[dict[str, Any]]:
        """The Job template(s) the chart renders into a ConfigMap for the service."""
        return [
            yaml.safe_load(d["data"]["search-job.yaml"])
            for d in self.of_kind("ConfigMap")
            if "search-job.yaml" in d.get("data", {})
        ]

    @property
    def test_pod(self) -> dict[str, Any]:
        pods = [d for d in self.of_kind("Pod") if d["metadata"]["annotations"]["helm.sh/hook"]]
        assert len(pods) == 1
        return pods[0]


def _remote_stores(values: dict[str, Any]) -> bool:
    config = values["config"]
    return all(
        str(where).startswith(("s3://", "gs://", "az://"))
        for where in (config["registry"]["root"], config["checkpoint"]["dir"])
    )


def _scope(values: dict[str, Any]) -> str:
    return str(values["config"]["model"].get("scope", "global"))


def _autoscaled(values: dict[str, Any]) -> bool:
    scaling = values["autoscaling"]
    return bool(scaling["keda"]["enabled"] or scaling["hpa"]["enabled"])


def _ready_is_up(values: dict[str, Any]) -> bool:
    """Readiness on /healthz: several pods, or partition members that roll by surge."""
    several = values["replicaCount"] > 1 or _autoscaled(values)
    return several or (_scope(values) == "partition" and _remote_stores(values))


def _secret_env(values: dict[str, Any]) -> dict[str, str]:
    """Stand-in secret values for validation, for exactly the secrets delivered as env."""
    secrets = values["secrets"]
    delivered = {
        "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": secrets["checkpointKey"],
        "STREAM_TRAINER_KAFKA__SASL_PASSWORD": secrets["kafkaSasl"],
    }
    return {
        name: STAND_IN
        for name, ref in delivered.items()
        if ref["existingSecret"] and ref["as"] == "env"
    }


@pytest.fixture(scope="module", params=CASES)
def rendered(request: pytest.FixtureRequest, chart: helm.Chart) -> Rendered:
    return Rendered(chart, _case_values(request.param))


# -- lint, schema, Kubernetes validity ---------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean_in_strict_mode(case: str) -> None:
    report = helm.lint(CHART_DIR, _case_values(case), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 2 = warning, 3 = error; 1 (info, e.g. "icon is recommended") is allowed.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_values_validate_against_the_schema(case: str, chart: helm.Chart) -> None:
    values = _case_values(case)
    chart.validate_schema(values)  # Helm's own validator
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(chart.merge_values(values), schema, cls=jsonschema.Draft202012Validator)


def test_every_rendered_manifest_is_valid_kubernetes(rendered: Rendered) -> None:
    checked = 0
    for doc in rendered.docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    for job in rendered.search_jobs:
        kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    # At least ConfigMap, Service, ServiceAccount, workload and the test pod.
    assert checked >= 5


def test_every_object_carries_the_standard_labels(rendered: Rendered) -> None:
    for doc in rendered.docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "stream-trainer"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == stream_trainer.__version__


# -- the config file ---------------------------------------------------------------------


def test_configmap_config_passes_the_services_own_validation(rendered: Rendered) -> None:
    settings = settings_from_mapping(rendered.config, env=_secret_env(rendered.values))
    assert settings.training.mode == rendered.values["config"]["training"]["mode"]
    assert settings.http.port == rendered.container["ports"][0]["containerPort"]


def test_rendered_config_without_the_secrets_is_rejected_by_the_service() -> None:
    # Proves the previous test's env stand-ins matter: with SASL and the key delivered as
    # env vars, the ConfigMap alone is not a complete config.
    with helm.Chart.load(CHART_DIR) as chart:
        sasl = Rendered(chart, _case_values("sasl-ssl-values.yaml"))
    with pytest.raises(ConfigError, match="checkpoint"):
        settings_from_mapping(sasl.config, env={})


def test_checksum_annotation_rolls_the_pod_when_the_config_changes(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        pod = Rendered(chart, values).workload["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/config"])

    base = checksum({})
    assert base == checksum({"resources": {"limits": {"memory": "3Gi"}}})
    assert base != checksum({"config": {"logging": {"level": "DEBUG"}}})


# -- secrets -----------------------------------------------------------------------------


def _walk_keys(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, value
            yield from _walk_keys(value, path)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_keys(item, prefix)


def test_secrets_appear_only_as_references(rendered: Rendered) -> None:
    assert rendered.of_kind("Secret") == []
    for path, _ in _walk_keys(rendered.config):
        leaf = path.rsplit(".", 1)[-1]
        assert leaf not in ("sasl_password", "hmac_key", "password", "token"), path
    for env in rendered.container.get("env", []):
        if env["name"] in SECRET_ENV:
            assert "value" not in env
            assert env["valueFrom"]["secretKeyRef"]["name"]
    # Every secret file the config names is a key of a mounted Secret volume.
    secret_volumes = {v["name"]: v["secret"] for v in rendered.pod_spec["volumes"] if "secret" in v}
    mounted: dict[str, str] = {}
    for mount in rendered.container["volumeMounts"]:
        if mount["name"] in secret_volumes:
            assert mount["readOnly"] is True
            for item in secret_volumes[mount["name"]]["items"]:
                mounted[f"{mount['mountPath']}/{item['path']}"] = secret_volumes[mount["name"]][
                    "secretName"
                ]
    config = rendered.config
    kafka_files = (
        "sasl_password_file",
        "ssl_ca_location",
        "ssl_certificate_location",
        "ssl_key_location",
    )
    files = [
        config["checkpoint"].get("hmac_key_file"),
        *(config["kafka"].get(k) for k in kafka_files),
    ]
    for file in filter(None, files):
        assert file in mounted, f"{file} is not a mounted Secret key"


def test_the_checkpoint_key_is_always_referenced(rendered: Rendered) -> None:
    secret = rendered.values["secrets"]["checkpointKey"]["existingSecret"]
    env_refs = [
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in rendered.container.get("env", [])
        if e["name"] == "STREAM_TRAINER_CHECKPOINT__HMAC_KEY"
    ]
    file_refs = [
        v["secret"]["secretName"]
        for v in rendered.pod_spec["volumes"]
        if v["name"] == "checkpoint-key"
    ]
    assert env_refs + file_refs == [secret]


def test_an_s3_registry_gets_its_keys_from_a_secret_as_env(chart: helm.Chart) -> None:
    r = Rendered(
        chart,
        {
            "config": {
                "registry": {"root": "s3://models/prod"},
                "object_store": {"endpoint_url": "https://minio.storage:9000", "path_style": True},
            },
            "secrets": {"objectStore": {"existingSecret": "s3-keys"}},
        },
    )
    env = {e["name"]: e for e in r.container["env"]}
    for name, key in (
        ("AWS_ACCESS_KEY_ID", "access-key-id"),
        ("AWS_SECRET_ACCESS_KEY", "secret-access-key"),
    ):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": key}
    settings = settings_from_mapping(r.config, env=_secret_env(r.values))
    assert settings.registry.root == "s3://models/prod"
    assert "AWS_ACCESS_KEY_ID" not in {
        e["name"] for e in Rendered(chart, {}).container.get("env", [])
    }


def test_sasl_ssl_wires_password_and_tls_files(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values("sasl-ssl-values.yaml"))
    kafka = r.config["kafka"]
    assert kafka["security_protocol"] == "SASL_SSL"
    assert kafka["sasl_password_file"].endswith("/password")
    assert kafka["ssl_ca_location"].endswith("/ca.crt")
    assert kafka["ssl_key_location"].endswith("/user.key")
    settings = settings_from_mapping(r.config, env=_secret_env(r.values))
    assert settings.kafka.sasl_password_file is not None


# -- pod security and probes -------------------------------------------------------------


def _assert_restricted(pod_spec: dict[str, Any], api_token: bool = False) -> None:
    pod_sc = pod_spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    # Only a service that creates search Jobs gets its token (its Role allows nothing else).
    assert pod_spec["automountServiceAccountToken"] is api_token
    assert "hostNetwork" not in pod_spec
    assert "hostPID" not in pod_spec
    for container in pod_spec["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert sc.get("privileged") is not True
    for volume in pod_spec.get("volumes", []):
        assert "hostPath" not in volume


def test_pods_satisfy_the_restricted_profile(rendered: Rendered) -> None:
    _assert_restricted(rendered.pod_spec, api_token=rendered.values["search"]["jobs"]["enabled"])
    _assert_restricted(rendered.test_pod["spec"])
    for job in rendered.search_jobs:
        _assert_restricted(job["spec"]["template"]["spec"])
    mounts = {m["mountPath"]: m["name"] for m in rendered.container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_probes_point_at_real_endpoints_on_the_config_port(rendered: Rendered) -> None:
    container = rendered.container
    (port,) = container["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == rendered.config["http"]["port"]
    assert rendered.config["http"]["enabled"] is True
    # With several members ready means up: a standby's /readyz is 503, and a partition
    # member's assignment is the group's doing.
    ready = "/healthz" if _ready_is_up(rendered.values) else "/readyz"
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": ready,
    }
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    service = next(s for s in rendered.of_kind("Service") if "clusterIP" not in s["spec"])
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    command = rendered.test_pod["spec"]["containers"][0]["command"]
    assert command[-1].endswith(f":{service['spec']['ports'][0]['port']}{ready}")
    assert command[:2] == ["python", "-c"]


def test_grace_period_exceeds_the_shutdown_bound(rendered: Rendered) -> None:
    bound = float(rendered.config.get("shutdown", {}).get("timeout_s", 25.0))
    assert rendered.pod_spec["terminationGracePeriodSeconds"] > bound


def test_the_workload_runs_the_service_with_its_config_file(rendered: Rendered) -> None:
    assert rendered.container["args"] == ["run", "--config", "/etc/stream-trainer/config.yaml"]
    mount = next(m for m in rendered.container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/stream-trainer/config.yaml"
    if _autoscaled(rendered.values):
        # The autoscaler owns the count: an upgrade must not reset it.
        assert "replicas" not in rendered.workload["spec"]
    else:
        assert rendered.workload["spec"]["replicas"] == rendered.values["replicaCount"]


# -- workload kinds and storage ----------------------------------------------------------


def test_default_is_a_recreate_deployment_with_its_own_claim(chart: helm.Chart) -> None:
    r = Rendered(chart, {})
    assert r.workload["kind"] == "Deployment"
    assert r.workload["spec"]["strategy"] == {"type": "Recreate"}
    claim = r.one("PersistentVolumeClaim")
    data = next(v for v in r.pod_spec["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert r.config["checkpoint"]["dir"].startswith("/data/")


def test_statefulset_uses_a_claim_template(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values("statefulset-values.yaml"))
    assert r.workload["kind"] == "StatefulSet"
    assert r.of_kind("PersistentVolumeClaim") == []
    (template,) = r.workload["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "data"
    assert template["spec"]["storageClassName"] == "fast-ssd"
    headless = [s for s in r.of_kind("Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [r.workload["spec"]["serviceName"]]


def test_existing_claim_creates_no_claim(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values("existing-claim-values.yaml"))
    assert r.of_kind("PersistentVolumeClaim") == []
    data = next(v for v in r.pod_spec["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "stream-trainer-data"


def _data_volume(r: Rendered) -> list[dict[str, Any]]:
    mounts = [m for m in r.container["volumeMounts"] if m["name"] == "data"]
    return [v for v in r.pod_spec["volumes"] if v["name"] == "data"] + mounts


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_registry_and_checkpoints_in_object_storage_need_no_volume(
    chart: helm.Chart, kind: str
) -> None:
    values = _case_values("object-store-values.yaml")
    values["workload"] = {"kind": kind}
    r = Rendered(chart, values)
    assert r.of_kind("PersistentVolumeClaim") == []
    assert "volumeClaimTemplates" not in r.workload["spec"]
    assert _data_volume(r) == []
    tmp = next(v for v in r.pod_spec["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp  # the one writable folder the pod keeps
    assert r.config["registry"]["root"] == "s3://models/prod"
    assert r.config["checkpoint"]["dir"] == "s3://models/prod-checkpoints"
    account = r.one("ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/stream-trainer"
    }
    assert r.pod_spec["serviceAccountName"] == account["metadata"]["name"]
    assert "object storage" in r.notes
    for doc in r.docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("registry", "checkpoints"),
    [
        ("gs://models/prod", "gs://models/ckpt"),
        ("az://models/prod", "az://models/ckpt"),
    ],
)
def test_gs_and_az_locations_need_no_volume_either(
    chart: helm.Chart, registry: str, checkpoints: str
) -> None:
    values = {"config": {"registry": {"root": registry}, "checkpoint": {"dir": checkpoints}}}
    r = Rendered(chart, values)
    assert r.of_kind("PersistentVolumeClaim") == []
    assert _data_volume(r) == []


def test_only_one_location_in_object_storage_keeps_the_volume(chart: helm.Chart) -> None:
    r = Rendered(chart, {"config": {"registry": {"root": "s3://models/prod"}}})
    assert len(r.of_kind("PersistentVolumeClaim")) == 1
    assert len(_data_volume(r)) == 2  # the volume and its mount


# -- hot standby ------------------------------------------------------------------------


def _spread(r: Rendered) -> list[dict[str, Any]]:
    spread: list[dict[str, Any]] = r.pod_spec.get("topologySpreadConstraints", [])
    return spread


def _readiness_path(r: Rendered) -> str:
    path: str = r.container["readinessProbe"]["httpGet"]["path"]
    return path


def test_one_pod_keeps_recreate_readyz_and_no_budget(chart: helm.Chart) -> None:
    for case in ("default", "object-store-values.yaml"):
        r = Rendered(chart, _case_values(case))
        assert r.workload["spec"]["replicas"] == 1
        assert r.workload["spec"]["strategy"] == {"type": "Recreate"}
        assert _readiness_path(r) == "/readyz"
        assert r.of_kind("PodDisruptionBudget") == []
        assert _spread(r) == []
        assert r.test_pod["spec"]["containers"][0]["command"][-1].endswith("/readyz")


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_standbys_with_both_stores_remote(chart: helm.Chart, kind: str) -> None:
    values = _merge(_case_values("standby-values.yaml"), {"workload": {"kind": kind}})
    r = Rendered(chart, values)
    assert r.workload["kind"] == kind
    assert r.workload["spec"]["replicas"] == 2
    # Nothing on the pod's disk: no claim, no claim template, no data volume.
    assert r.of_kind("PersistentVolumeClaim") == []
    assert "volumeClaimTemplates" not in r.workload["spec"]
    assert _data_volume(r) == []
    if kind == "Deployment":
        # One pod at a time, never a third: a rollout always leaves a member that can train.
        assert r.workload["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }
    else:
        assert r.workload["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    # A standby is up but answers 503 on /readyz forever: ready = /healthz, so neither the
    # rollout nor the budget waits on it; the helm test follows (the Service reaches both).
    assert _readiness_path(r) == "/healthz"
    assert r.test_pod["spec"]["containers"][0]["command"][-1].endswith("/healthz")
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"] == r.workload["spec"]["selector"]
    (spread,) = _spread(r)
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    assert spread["maxSkew"] == 1
    assert spread["labelSelector"] == r.workload["spec"]["selector"]
    assert "hot standbys" in r.notes
    # No fixed static member id: each pod's defaults to its own name (distinct per pod).
    assert "group_instance_id" not in r.config["kafka"]
    for doc in r.docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_standby_budget_spread_and_overrides(chart: helm.Chart) -> None:
    base = _case_values("standby-values.yaml")
    own = [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app": "x"}},
        }
    ]
    r = Rendered(
        chart,
        _merge(
            base,
            {
                "replicaCount": 3,
                "topologySpreadConstraints": own,
                "podDisruptionBudget": {"minAvailable": "50%"},
            },
        ),
    )
    assert r.workload["spec"]["replicas"] == 3
    assert _spread(r) == own  # the user's constraints replace the default
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == "50%"
    assert "maxUnavailable" not in pdb["spec"]

    off = Rendered(
        chart,
        _merge(
            base,
            {"standby": {"spreadAcrossNodes": False}, "podDisruptionBudget": {"enabled": False}},
        ),
    )
    assert _spread(off) == []
    assert off.of_kind("PodDisruptionBudget") == []
    assert off.workload["spec"]["replicas"] == 2


# -- partition scope and autoscaling ---------------------------------------------------

PARTITION = "partition-values.yaml"
KEDA = "keda-values.yaml"
HPA = "hpa-values.yaml"


def _validate_builtin(r: Rendered) -> None:
    for doc in r.docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _target(r: Rendered) -> dict[str, str]:
    return {
        "apiVersion": "apps/v1",
        "kind": r.workload["kind"],
        "name": r.workload["metadata"]["name"],
    }


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_partition_scope_with_three_members(chart: helm.Chart, kind: str) -> None:
    r = Rendered(chart, _merge(_case_values(PARTITION), {"workload": {"kind": kind}}))
    assert r.workload["spec"]["replicas"] == 3
    assert r.of_kind("PersistentVolumeClaim") == []
    assert "volumeClaimTemplates" not in r.workload["spec"]
    assert _data_volume(r) == []
    if kind == "Deployment":
        # A new pod joins before an old one leaves: partitions are handed over, never
        # left without a member.
        assert r.workload["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        }
    # A member holding no partition (a surge pod, more members than partitions) is up.
    assert _readiness_path(r) == "/healthz"
    assert r.test_pod["spec"]["containers"][0]["command"][-1].endswith("/healthz")
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == r.workload["spec"]["selector"]
    (spread,) = _spread(r)
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert "group_instance_id" not in r.config["kafka"]
    settings = settings_from_mapping(r.config, env=_secret_env(r.values))
    assert settings.model.scope == "partition"
    # The pod outlives its shutdown bound: the revoke checkpoints fit in the grace period.
    assert r.pod_spec["terminationGracePeriodSeconds"] == math.ceil(
        settings.shutdown.timeout_s
    ) + int(r.values["terminationGraceMarginSeconds"])
    assert "Partition scope" in r.notes and "hot standbys" not in r.notes
    assert r.of_kind("ScaledObject") == r.of_kind("HorizontalPodAutoscaler") == []
    _validate_builtin(r)


def test_partition_scope_rolling_needs_no_volume(chart: helm.Chart) -> None:
    # One member on a volume: Recreate (the volume is ReadWriteOnce) and /readyz, as today.
    on_volume = Rendered(chart, {"config": {"model": {"scope": "partition"}}})
    assert on_volume.workload["spec"]["strategy"] == {"type": "Recreate"}
    assert _readiness_path(on_volume) == "/readyz"
    assert on_volume.of_kind("PodDisruptionBudget") == []
    # One member, both stores remote: still a surge roll (the new pod joins first).
    values = _merge(_case_values(PARTITION), {"replicaCount": 1})
    remote = Rendered(chart, values)
    assert remote.workload["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 1,
        "maxUnavailable": 0,
    }
    assert _readiness_path(remote) == "/healthz"
    assert remote.of_kind("PodDisruptionBudget") == []


def test_keda_scales_the_members_on_the_groups_lag(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values(KEDA))
    scaled = r.one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == _target(r)
    assert "replicas" not in r.workload["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 8)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == {
        "scaleDown": {"stabilizationWindowSeconds": 300}
    }
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    config = r.config
    assert trigger["metadata"] == {
        "bootstrapServers": config["kafka"]["bootstrap_servers"],
        "consumerGroup": config["kafka"]["group_id"],
        "topic": config["topics"]["input"][0],
        "lagThreshold": "200000",
        "activationLagThreshold": "1000",
        "allowIdleConsumers": "false",
        "offsetResetPolicy": "earliest",
    }
    # Every metadata value is a string (KEDA's CRD: a map of strings).
    assert all(isinstance(v, str) for v in trigger["metadata"].values())
    # SASL_SSL: KEDA authenticates like the pod, from the pod's own Secrets.
    auth = r.one("TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    secret_refs = {
        ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]
    }
    secrets = r.values["secrets"]
    assert secret_refs == {
        "password": (secrets["kafkaSasl"]["existingSecret"], secrets["kafkaSasl"]["key"]),
        "ca": (secrets["kafkaTls"]["existingSecret"], "ca.crt"),
        "cert": (secrets["kafkaTls"]["existingSecret"], "user.crt"),
        "key": (secrets["kafkaTls"]["existingSecret"], "user.key"),
    }
    pod_secrets = {v["secret"]["secretName"] for v in r.pod_spec["volumes"] if "secret" in v}
    assert {name for name, _ in secret_refs.values()} <= pod_secrets
    plain = next(c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("keda-kafka"))
    refs = {ref["parameter"]: ref for ref in auth["spec"]["configMapTargetRef"]}
    assert {p: plain["data"][ref["key"]] for p, ref in refs.items()} == {
        "tls": "enable",
        "sasl": "scram_sha512",
        "username": "stream-trainer",
    }
    assert all(ref["name"] == plain["metadata"]["name"] for ref in refs.values())
    # Members come and go: the budget, /healthz readiness and the surge roll apply.
    assert r.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert _readiness_path(r) == "/healthz"
    assert r.workload["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1
    assert r.of_kind("HorizontalPodAutoscaler") == []
    assert "KEDA scales the members between 2 and 8" in r.notes
    _validate_builtin(r)


def test_keda_defaults_plaintext_and_maximum(chart: helm.Chart) -> None:
    values = _merge(
        _case_values(PARTITION),
        {"autoscaling": {"partitions": 6, "keda": {"enabled": True}}},
    )
    r = Rendered(chart, values)
    spec = r.one("ScaledObject")["spec"]
    # maxReplicaCount defaults to the partition count; PLAINTEXT needs no authentication.
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    assert "authenticationRef" not in spec["triggers"][0]
    assert r.of_kind("TriggerAuthentication") == []
    assert len(r.of_kind("ConfigMap")) == 1
    assert spec["triggers"][0]["metadata"]["lagThreshold"] == "100000"
    windowed = Rendered(
        chart, _merge(values, {"autoscaling": {"scaleDownStabilizationWindowSeconds": 900}})
    )
    behavior = windowed.one("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert behavior["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 900
    # TLS without SASL: tls only, the CA from the pod's TLS Secret.
    tls = Rendered(
        chart,
        _merge(
            values,
            {
                "config": {"kafka": {"security_protocol": "SSL"}},
                "secrets": {"kafkaTls": {"existingSecret": "kafka-ca"}},
            },
        ),
    )
    auth = tls.one("TriggerAuthentication")["spec"]
    assert [ref["parameter"] for ref in auth["configMapTargetRef"]] == ["tls"]
    assert auth["secretTargetRef"] == [{"parameter": "ca", "name": "kafka-ca", "key": "ca.crt"}]


def test_hpa_scales_the_members_on_their_own_lag(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values(HPA))
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == _target(r)
    assert "replicas" not in r.workload["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 6)  # max = the partitions
    (metric,) = spec["metrics"]
    assert metric == {
        "type": "External",
        "external": {
            "metric": {
                "name": "stream_trainer_consumer_lag_records",
                "selector": {"matchLabels": {"service": r.one("Service")["metadata"]["name"]}},
            },
            "target": {"type": "AverageValue", "averageValue": "50000"},
        },
    }
    assert spec["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 300}}
    assert r.of_kind("ScaledObject") == r.of_kind("TriggerAuthentication") == []
    assert r.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    own = Rendered(
        chart,
        _merge(
            _case_values(HPA),
            {"autoscaling": {"hpa": {"metricSelector": {"job": "trainer"}, "maxReplicas": 4}}},
        ),
    ).one("HorizontalPodAutoscaler")["spec"]
    assert own["metrics"][0]["external"]["metric"]["selector"] == {
        "matchLabels": {"job": "trainer"}
    }
    assert own["maxReplicas"] == 4
    _validate_builtin(r)  # the HPA is built in: kubernetes-validate checks it strictly


_PARTITION_REMOTE = {
    "config": {
        "model": {"scope": "partition"},
        "registry": {"root": "s3://models/prod"},
        "checkpoint": {"dir": "s3://models/prod-checkpoints"},
    }
}


def _scaled(kind: str, **scaling: Any) -> dict[str, Any]:
    return _merge(_PARTITION_REMOTE, {"autoscaling": {kind: {"enabled": True}, **scaling}})


AUTOSCALING_FAILS = [
    pytest.param(
        _merge(_scaled("keda", partitions=6), {"autoscaling": {"hpa": {"enabled": True}}}),
        "autoscaling.keda and autoscaling.hpa are mutually exclusive",
        id="keda-and-hpa",
    ),
    pytest.param(
        _merge(_scaled("keda", partitions=6), {"config": {"model": {"scope": "global"}}}),
        "autoscaling.keda needs config.model.scope partition (it is global): with global "
        "scope one pod trains and the others stand by, so more replicas add no throughput",
        id="keda-global-scope",
    ),
    pytest.param(
        _merge(_scaled("hpa", partitions=6), {"config": {"model": {"scope": "global"}}}),
        "autoscaling.hpa needs config.model.scope partition (it is global)",
        id="hpa-global-scope",
    ),
    pytest.param(
        _merge(_scaled("keda", partitions=6), {"config": {"checkpoint": {"dir": "/data/ckpt"}}}),
        "autoscaling.keda needs config.checkpoint.dir and config.registry.root both on an "
        "object store",
        id="keda-volume",
    ),
    pytest.param(
        _merge(_scaled("hpa", partitions=6), {"config": {"registry": {"root": "/data/reg"}}}),
        "autoscaling.hpa needs config.checkpoint.dir and config.registry.root both on an "
        "object store",
        id="hpa-volume",
    ),
    pytest.param(
        _scaled("keda"),
        "autoscaling.partitions must state the input partition count when autoscaling.keda "
        "is enabled",
        id="keda-no-partitions",
    ),
    pytest.param(
        _scaled("hpa"),
        "autoscaling.partitions must state the input partition count when autoscaling.hpa",
        id="hpa-no-partitions",
    ),
    pytest.param(
        _scaled("keda", partitions=4, keda={"enabled": True, "maxReplicaCount": 5}),
        "autoscaling.keda.maxReplicaCount (5) exceeds autoscaling.partitions (4): a member "
        "beyond the partition count is assigned no partition and trains nothing",
        id="keda-max-above-partitions",
    ),
    pytest.param(
        _scaled("hpa", partitions=4, hpa={"enabled": True, "maxReplicas": 9}),
        "autoscaling.hpa.maxReplicas (9) exceeds autoscaling.partitions (4)",
        id="hpa-max-above-partitions",
    ),
    pytest.param(
        _scaled("hpa", partitions=4, hpa={"enabled": True, "minReplicas": 5}),
        "the minimum replicas of autoscaling.hpa (5) exceed its maximum (4)",
        id="hpa-min-above-max",
    ),
    pytest.param(
        _merge(_scaled("keda", partitions=4), {"config": {"topics": {"input": ["a", "b"]}}}),
        "autoscaling.keda needs exactly one input topic (config.topics.input has 2: a, b)",
        id="keda-two-topics",
    ),
    pytest.param(
        _merge(_scaled("keda", partitions=4), {"config": {"kafka": {"group_instance_id": "m"}}}),
        "config.kafka.group_instance_id (m) must be unset when replicaCount > 1 or "
        "autoscaling is on",
        id="keda-static-member-id",
    ),
    pytest.param(
        {"replicaCount": 3, "config": {"model": {"scope": "partition"}}},
        "replicaCount 3 needs config.checkpoint.dir and config.registry.root both on an object "
        "store (s3://, gs://, az://): with model.scope partition a partition's checkpoints "
        "move with it",
        id="partition-replicas-volume",
    ),
    pytest.param(
        {
            "replicaCount": 2,
            "config": {"model": {"scope": "partition"}, "registry": {"root": "s3://m/p"}},
        },
        "replicaCount 2 needs config.checkpoint.dir and config.registry.root both",
        id="partition-replicas-one-store-remote",
    ),
]


@pytest.mark.parametrize(("values", "message"), AUTOSCALING_FAILS)
def test_partition_and_autoscaling_rules_fail_the_render(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    chart.validate_schema(values)  # the values are well-formed: the template refuses them
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# -- monitoring --------------------------------------------------------------------------


def test_monitoring_objects_are_off_by_default(chart: helm.Chart) -> None:
    kinds = {doc["kind"] for doc in Rendered(chart, {}).docs}
    assert kinds.isdisjoint({"ServiceMonitor", "PrometheusRule", "NetworkPolicy"})
    assert len(Rendered(chart, {}).of_kind("ConfigMap")) == 1


def test_monitoring_objects_when_enabled(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values("monitoring-values.yaml"))
    monitor = r.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    service = next(s for s in r.of_kind("Service") if "clusterIP" not in s["spec"])
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()

    rule = r.one("PrometheusRule")
    source = yaml.safe_load((CHART_DIR / "files" / "prometheus-rules.yaml").read_text("utf-8"))
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    # The runbook links keep their anchors and take the configured base.
    values = _case_values("monitoring-values.yaml")
    values["metrics"]["prometheusRule"]["runbookBaseUrl"] = "https://wiki.example/ops/st/"
    custom = Rendered(chart, values).one("PrometheusRule")
    urls = [
        rule["annotations"]["runbook_url"]
        for group in custom["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert urls and all(url.startswith("https://wiki.example/ops/st#") for url in urls), urls
    assert "https://wiki.example/ops/st#streamtrainerpartitionhalted" in urls

    dashboard = next(c for c in r.of_kind("ConfigMap") if "config.yaml" not in c["data"])
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = dashboard["data"].values()
    source_json = (CHART_DIR / "files" / "grafana-dashboard.json").read_text("utf-8")
    assert json.loads(body) == json.loads(source_json)

    policy = r.one("NetworkPolicy")
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    # `helm test` still reaches /readyz when ingress is restricted.
    test_labels = r.test_pod["metadata"]["labels"]
    peers = [p["podSelector"]["matchLabels"] for p in ingress["from"] if "podSelector" in p]
    assert any(peer.items() <= test_labels.items() for peer in peers)


# -- invalid values ----------------------------------------------------------------------


INVALID = [
    pytest.param({"replicaCount": -1}, "replicaCount", id="negative-replicas"),
    pytest.param(
        {"podDisruptionBudget": {"maxUnavailable": "half"}}, "maxUnavailable", id="bad-pdb-budget"
    ),
    pytest.param({"standby": {"spreadAcrossNodes": "yes"}}, "spreadAcrossNodes", id="bad-spread"),
    pytest.param({"config": {"training": {"mode": "bogus"}}}, "mode", id="bad-mode"),
    pytest.param({"replicas": 1}, "replicas", id="unknown-top-level-key"),
    pytest.param({"workload": {"kind": "DaemonSet"}}, "kind", id="bad-workload-kind"),
    pytest.param(
        {"config": {"kafka": {"sasl_password": "hunter2"}}}, "sasl_password", id="secret-in-values"
    ),
    pytest.param(
        {"extraEnv": [{"name": "STREAM_TRAINER_CHECKPOINT__HMAC_KEY", "value": "k"}]},
        "extraEnv",
        id="literal-secret-env",
    ),
    pytest.param({"config": {"http": {"enabled": False}}}, "enabled", id="http-disabled"),
    pytest.param({"config": {"model": {"scope": "topic"}}}, "scope", id="bad-scope"),
    pytest.param({"autoscaling": {"partitions": 0}}, "partitions", id="zero-partitions"),
    pytest.param(
        {"autoscaling": {"keda": {"lagThreshold": "lots"}}}, "lagThreshold", id="bad-lag-threshold"
    ),
    pytest.param({"autoscaling": {"hpa": {"minReplicas": 0}}}, "minReplicas", id="hpa-min-zero"),
    pytest.param({"autoscaling": {"keda": {"cooldown": 5}}}, "cooldown", id="unknown-keda-key"),
    pytest.param(
        {"config": {"kafka": {"security_protocol": "SASL_SSL"}}},
        "existingSecret",
        id="sasl-without-secret",
    ),
    pytest.param(
        {"secrets": {"checkpointKey": {"existingSecret": ""}}},
        "existingSecret",
        id="no-checkpoint-key",
    ),
]


@pytest.mark.parametrize(("values", "named"), INVALID)
def test_invalid_values_are_rejected_by_the_schema(
    chart: helm.Chart, values: dict[str, Any], named: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.validate_schema(values)
    assert named in str(raised.value)
    report = helm.lint(CHART_DIR, values, strict=True)
    assert report["errors"], "lint must fail on invalid values"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"terminationGracePeriodSeconds": 20},
            "terminationGracePeriodSeconds (20) must exceed config.shutdown.timeout_s",
        ),
        ({"config": {"checkpoint": {"dir": "/var/ckpt"}}}, "must be below persistence.mountPath"),
        (
            {"replicaCount": 2},
            "replicaCount 2 needs config.checkpoint.dir and config.registry.root both on an "
            "object store",
        ),
        (
            # Only the registry remote: the checkpoint folder is still on the pod's volume.
            {"replicaCount": 3, "config": {"registry": {"root": "s3://models/prod"}}},
            "replicaCount 3 needs config.checkpoint.dir and config.registry.root both",
        ),
        (
            {"replicaCount": 2, "workload": {"kind": "StatefulSet"}},
            "replicaCount 2 needs config.checkpoint.dir and config.registry.root both",
        ),
        (
            _merge(
                yaml.safe_load((CHART_DIR / "ci" / "standby-values.yaml").read_text("utf-8")),
                {"config": {"kafka": {"group_instance_id": "trainer-0"}}},
            ),
            "config.kafka.group_instance_id (trainer-0) must be unset when replicaCount > 1",
        ),
    ],
)
def test_cross_field_rules_fail_the_render(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_computed_grace_period_follows_the_shutdown_bound(chart: helm.Chart) -> None:
    r = Rendered(chart, {"config": {"shutdown": {"timeout_s": 42.5}}})
    margin = r.values["terminationGraceMarginSeconds"]
    assert r.pod_spec["terminationGracePeriodSeconds"] == math.ceil(42.5) + margin


def test_every_value_in_values_yaml_is_commented(chart: helm.Chart) -> None:
    # A leaf value (per the schema) needs a comment right above it; a section (an object
    # with declared properties) does not; opaque objects and lists are commented as a whole.
    schema = chart.schema
    assert schema is not None
    stack: list[tuple[int, str]] = []
    previous = ""
    uncommented = []
    for line in (CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            stack = [(i, k) for i, k in stack if i < indent]
            stack.append((indent, key))
            node: dict[str, Any] | None = schema
            for _, part in stack:
                properties = node.get("properties") if node else None
                node = properties.get(part) if properties else None
            is_section = node is not None and "properties" in node
            if node is not None and not is_section and not previous.startswith("#"):
                uncommented.append(".".join(k for _, k in stack))
        previous = line.strip()
    assert uncommented == []


# -- chart metadata and schema coverage --------------------------------------------------


def test_app_version_is_the_package_version(chart: helm.Chart) -> None:
    assert chart.metadata["appVersion"] == stream_trainer.__version__
    image = Rendered(chart, {}).container["image"]
    assert image.endswith(f":{stream_trainer.__version__}")


def _settings_fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _settings_fields(annotation, f"{path}.")


def _schema_fields(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path
        yield from _schema_fields(sub, f"{path}.")


def test_config_schema_mirrors_the_services_settings(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    config_schema = schema["properties"]["config"]
    in_schema = set(_schema_fields(config_schema))
    in_settings = {
        f
        for f in _settings_fields(Settings)
        # EstimatorSpec sits in a list (preprocessing), covered via model.learner.
        if not f.startswith("model.preprocessing.")
    }
    assert in_settings - CHART_OWNED_FIELDS <= in_schema
    assert in_schema.isdisjoint(CHART_OWNED_FIELDS)
    assert config_schema["additionalProperties"] is False
    assert schema["additionalProperties"] is False


# -- search trials as a Kubernetes Job ------------------------------------------------------

SEARCH_JOBS = "search-jobs-values.yaml"


def test_search_jobs_are_off_by_default(chart: helm.Chart) -> None:
    r = Rendered(chart, {})
    assert r.search_jobs == []
    assert r.of_kind("Role") == [] and r.of_kind("RoleBinding") == []
    assert "jobs" not in r.config.get("training", {}).get("full_batch", {}).get("search", {})


def test_search_job_template_runs_the_worker_like_the_service(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values(SEARCH_JOBS))
    (job,) = r.search_jobs
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == 4
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    # Same image and entry point as the service; the service appends --study / --snapshot.
    assert container["image"] == r.container["image"]
    assert container["args"] == ["search", "worker", "--config", "/etc/stream-trainer/config.yaml"]
    # Not selected by the Service (no metrics port there) nor the service's selector.
    service = r.one("Service")
    pod_labels = spec["template"]["metadata"]["labels"]
    assert not set(service["spec"]["selector"].items()) <= set(pod_labels.items())
    # The database URL: a file from the Secret, never a value; the snapshot claim read-only.
    env = {e["name"]: e for e in container["env"]}
    url_file = env["STREAM_TRAINER_SEARCH_DATABASE_URL_FILE"]["value"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["search-db"]["secret"]["secretName"] == "search-db"
    assert url_file == f"{mounts['search-db']['mountPath']}/url"
    assert mounts["search-snapshots"]["readOnly"] is True
    assert volumes["search-snapshots"]["persistentVolumeClaim"]["claimName"] == "search-snapshots"
    assert "STREAM_TRAINER_SEARCH_DATABASE_URL" not in env
    # The config the worker reads: the service's, whose checkpoint key file is mounted here.
    assert volumes["config"]["configMap"]["name"] == r.config_map["metadata"]["name"]
    key_file = r.config["checkpoint"]["hmac_key_file"]
    assert key_file.startswith(mounts["checkpoint-key"]["mountPath"] + "/")


def test_search_jobs_wire_the_service(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values(SEARCH_JOBS))
    jobs_cfg = r.config["training"]["full_batch"]["search"]["jobs"]
    settings = settings_from_mapping(r.config, env=_secret_env(r.values))
    assert settings.training.full_batch.search.jobs.enabled is True
    mounts = {m["mountPath"]: m["name"] for m in r.container["volumeMounts"]}
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    template = volumes[mounts[jobs_cfg["job_template"]]]["configMap"]["name"]
    assert template == f"{RELEASE}-stream-trainer-search-job"
    assert volumes[mounts[jobs_cfg["snapshot_dir"]]]["persistentVolumeClaim"]["claimName"] == (
        "search-snapshots"
    )
    env = {e["name"]: e for e in r.container["env"]}
    assert env["STREAM_TRAINER_SEARCH_DATABASE_URL_FILE"]["value"].startswith(
        "/etc/stream-trainer/secrets/search-db/"
    )
    # A changed Job template rolls the pod (it is mounted by subPath, never refreshed).
    before = r.workload["spec"]["template"]["metadata"]["annotations"]["checksum/search-job"]
    changed = _merge(_case_values(SEARCH_JOBS), {"search": {"jobs": {"backoffLimit": 5}}})
    after = Rendered(chart, changed).workload["spec"]["template"]["metadata"]["annotations"]
    assert after["checksum/search-job"] != before


def test_search_jobs_rbac_is_create_get_delete_jobs_in_the_namespace(chart: helm.Chart) -> None:
    r = Rendered(chart, _case_values(SEARCH_JOBS))
    role, binding = r.one("Role"), r.one("RoleBinding")
    assert r.of_kind("ClusterRole") == [] and r.of_kind("ClusterRoleBinding") == []
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "delete"]}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": r.pod_spec["serviceAccountName"],
            "namespace": NAMESPACE,
        }
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"search": {"jobs": {"databaseUrl": {"existingSecret": ""}}}},
            "databaseUrl.existingSecret",
        ),
        ({"search": {"jobs": {"snapshots": {"existingClaim": ""}}}}, "snapshots.existingClaim"),
        (
            {"config": {"training": {"full_batch": {"search": {"enabled": False}}}}},
            "search.jobs.enabled needs",
        ),
    ],
)
def test_search_jobs_need_their_secret_claim_and_a_search(
    chart: helm.Chart, change: dict[str, Any], message: str
) -> None:
    values = _merge(_case_values(SEARCH_JOBS), change)
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_search_jobs_config_field_is_the_charts(chart: helm.Chart) -> None:
    values = {"config": {"training": {"full_batch": {"search": {"jobs": {"enabled": True}}}}}}
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
