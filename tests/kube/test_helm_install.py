"""The chart installed with the real helm CLI into a real kube-apiserver (no kubelet).

What the API server shows: every rendered object is accepted (schema validation, the
Prometheus Operator's CRD schemas, admission) and stored; the pod template passes Pod
Security ``restricted`` (a server-side dry-run of a Pod made from it, in a namespace that
enforces, warns and audits ``restricted``); install, upgrade across every CI values file,
rollback and uninstall leave the objects the values ask for, and uninstall leaves the
checkpoint claim (``helm.sh/resource-policy: keep``). Pods never run: there is no kubelet.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.kube_env import ApiError, ApiServer, conditions

# The first test's setup may build kube-apiserver (~10 min cold) when `make kube-tools` did not.
pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "stream-trainer"
# Stand-ins for KEDA's CRDs (a typed subset of upstream's schema: see the file's comment).
KEDA_CRDS = Path(__file__).resolve().parent / "keda-crds.yaml"
VALUES_FILES = sorted(p.name for p in (CHART_DIR / "ci").glob("*-values.yaml"))
CASES = ["default", *VALUES_FILES]
RELEASE = "st"
FULLNAME = f"{RELEASE}-stream-trainer"
PSA_LABELS = {
    f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")
}

# kind -> (API group path, resource) of every kind the chart renders.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Pod": ("/api/v1", "pods"),
    "Secret": ("/api/v1", "secrets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "ServiceMonitor": ("/apis/monitoring.coreos.com/v1", "servicemonitors"),
    "PrometheusRule": ("/apis/monitoring.coreos.com/v1", "prometheusrules"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "ScaledObject": ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    "TriggerAuthentication": ("/apis/keda.sh/v1alpha1", "triggerauthentications"),
}


def _path(kind: str, namespace: str, name: str = "") -> str:
    group, resource = RESOURCES[kind]
    return f"{group}/namespaces/{namespace}/{resource}" + (f"/{name}" if name else "")


def _values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "ci" / case).read_text())
    return loaded


def _get(values: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def expected_kinds(case: str) -> dict[str, int]:
    """Objects per kind the values ask for (from the values, not from the rendering)."""
    values = _values(case)
    workload = _get(values, "workload.kind", "Deployment")
    kinds = {"ConfigMap": 1, "Service": 1, "ServiceAccount": 1, workload: 1}
    if workload == "StatefulSet":
        kinds["Service"] += 1  # its governing headless Service
    # Registry and checkpoints both in object storage: no claim (nothing on the pod's disk).
    remote = all(
        str(_get(values, field, "")).startswith(("s3://", "gs://", "az://"))
        for field in ("config.registry.root", "config.checkpoint.dir")
    )
    claim = not _get(values, "persistence.existingClaim", "") and not remote
    if workload == "Deployment" and claim:
        kinds["PersistentVolumeClaim"] = 1
    # Several pods (standbys or partition members, both stores remote): their budget.
    keda = _get(values, "autoscaling.keda.enabled", False)
    hpa = _get(values, "autoscaling.hpa.enabled", False)
    several = _get(values, "replicaCount", 1) > 1 or keda or hpa
    if several and _get(values, "podDisruptionBudget.enabled", True):
        kinds["PodDisruptionBudget"] = 1
    if keda:
        kinds["ScaledObject"] = 1
        if _get(values, "config.kafka.security_protocol", "PLAINTEXT") != "PLAINTEXT":
            # KEDA authenticates like the pod: its non-secret parameters in a ConfigMap.
            kinds["TriggerAuthentication"] = 1
            kinds["ConfigMap"] += 1
    if hpa:
        kinds["HorizontalPodAutoscaler"] = 1
    if _get(values, "metrics.serviceMonitor.enabled", False):
        kinds["ServiceMonitor"] = 1
    if _get(values, "metrics.prometheusRule.enabled", False):
        kinds["PrometheusRule"] = 1
    if _get(values, "metrics.grafanaDashboard.enabled", False):
        kinds["ConfigMap"] += 1
    if _get(values, "networkPolicy.enabled", False):
        kinds["NetworkPolicy"] = 1
    if _get(values, "search.jobs.enabled", False):
        # The search Job template's ConfigMap, and the Role (jobs) bound to the account.
        kinds["ConfigMap"] += 1
        kinds["Role"] = kinds["RoleBinding"] = 1
    return kinds


def live_kinds(kube: ApiServer, namespace: str) -> dict[str, int]:
    """Objects per kind of the release that the API server holds (by instance label)."""
    found: dict[str, int] = {}
    selector = {"labelSelector": f"app.kubernetes.io/instance={RELEASE}"}
    for kind in RESOURCES:
        if kind in ("Pod", "Secret"):  # the chart renders neither (the test pod is a hook)
            continue
        items = kube.request("GET", _path(kind, namespace), params=selector).body["items"]
        if items:
            found[kind] = len(items)
    return found


def make_namespace(kube: ApiServer, name: str) -> str:
    """A namespace that enforces, warns and audits Pod Security ``restricted``."""
    kube.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": PSA_LABELS}},
    )
    # The ServiceAccount admission plugin wants the pod's account to exist; the controller
    # that makes `default` in each namespace runs only with the node (test_node.py), and
    # may have made it first then.
    _create(
        kube,
        _path("ServiceAccount", name),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}},
    )
    return name


def make_prerequisites(kube: ApiServer, namespace: str, case: str) -> None:
    """What the chart expects to exist: the Secrets it references and an existing claim."""
    values = _values(case)
    secrets = {
        _get(values, "secrets.checkpointKey.existingSecret", "stream-trainer-checkpoint-key"): {
            "hmac-key": "00" * 32  # the key name the chart reads (README: --from-literal=hmac-key=)
        }
    }
    if name := _get(values, "secrets.kafkaSasl.existingSecret", ""):
        secrets[name] = {"password": "secret"}
    if name := _get(values, "secrets.kafkaTls.existingSecret", ""):
        secrets[name] = {"ca.crt": "ca", "user.crt": "crt", "user.key": "key"}
    if name := _get(values, "search.jobs.databaseUrl.existingSecret", ""):
        secrets[name] = {"url": "postgresql://trainer:stand-in@db:5432/studies"}
    for name, data in secrets.items():
        _create(
            kube,
            _path("Secret", namespace),
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
        )
    if claim := _get(values, "persistence.existingClaim", ""):
        _create(
            kube,
            _path("PersistentVolumeClaim", namespace),
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )


def _create(kube: ApiServer, path: str, body: dict[str, Any]) -> None:
    """Create unless it exists already (several values files share a Secret)."""
    try:
        kube.request("POST", path, body)
    except ApiError as error:
        if error.status != 409:
            raise


def helm_args(case: str) -> list[str]:
    return [] if case == "default" else ["-f", str(CHART_DIR / "ci" / case)]


def assert_no_warnings(stderr: str) -> None:
    """Helm prints the API server's warnings (Pod Security, unknown fields) on stderr."""
    for marker in ("PodSecurity", "unknown field", "Warning", "W1", "W0"):
        assert marker not in stderr, f"API server warned: {stderr}"


def pod_from_workload(workload: dict[str, Any]) -> dict[str, Any]:
    """The Pod the workload's controller would create (what Pod Security judges)."""
    template = workload["spec"]["template"]
    spec = dict(template["spec"])
    # A StatefulSet pod's claims come from its volumeClaimTemplates (named <vct>-<sts>-0).
    sts_name = workload["metadata"]["name"]
    extra = [
        {"name": vct["metadata"]["name"],
         "persistentVolumeClaim": {"claimName": f"{vct['metadata']['name']}-{sts_name}-0"}}
        for vct in workload["spec"].get("volumeClaimTemplates", [])
    ]  # fmt: skip
    if extra:
        spec["volumes"] = [*spec.get("volumes", []), *extra]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{sts_name}-psa-check", "labels": template["metadata"]["labels"]},
        "spec": spec,
    }


def dry_run_pod(kube: ApiServer, namespace: str, pod: dict[str, Any]) -> list[str]:
    """Server-side dry-run create (all admission runs, nothing stored); its warnings."""
    answer = kube.request("POST", _path("Pod", namespace), pod, params={"dryRun": "All"})
    assert answer.status == 201, answer.body
    return answer.warnings


def workload_of(kube: ApiServer, namespace: str) -> dict[str, Any]:
    for kind in ("Deployment", "StatefulSet"):
        with_name = _path(kind, namespace, FULLNAME)
        if kube.exists(with_name):
            return kube.request("GET", with_name).body
    raise AssertionError(f"no Deployment or StatefulSet {FULLNAME} in {namespace}")


def assert_pod_template_is_restricted(kube: ApiServer, namespace: str) -> None:
    warnings = dry_run_pod(kube, namespace, pod_from_workload(workload_of(kube, namespace)))
    assert warnings == [], warnings


def manifest_objects(kube: ApiServer, namespace: str) -> list[dict[str, Any]]:
    out = kube.helm("get", "manifest", RELEASE, "-n", namespace).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _crd_documents(kube: ApiServer) -> list[dict[str, Any]]:
    prometheus = [yaml.safe_load(path.read_text()) for path in kube.tools.crds]
    keda = [doc for doc in yaml.safe_load_all(KEDA_CRDS.read_text()) if doc]
    return prometheus + keda


def assert_autoscaler_stored(
    kube: ApiServer, namespace: str, values: dict[str, Any], workload: dict[str, Any]
) -> None:
    """The ScaledObject or HPA the API server holds targets the workload, within the
    partitions, and a TriggerAuthentication names only Secrets that exist."""
    target = {"apiVersion": "apps/v1", "kind": workload["kind"], "name": FULLNAME}
    partitions = _get(values, "autoscaling.partitions", 0)
    if _get(values, "autoscaling.keda.enabled", False):
        spec = kube.request("GET", _path("ScaledObject", namespace, FULLNAME)).body["spec"]
        assert spec["scaleTargetRef"] == target
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["allowIdleConsumers"] == "false"
        if ref := trigger.get("authenticationRef"):
            auth = kube.request("GET", _path("TriggerAuthentication", namespace, ref["name"]))
            for secret in auth.body["spec"].get("secretTargetRef", []):
                assert kube.exists(_path("Secret", namespace, secret["name"])), secret
    else:
        spec = kube.request("GET", _path("HorizontalPodAutoscaler", namespace, FULLNAME)).body
        assert spec["spec"]["scaleTargetRef"] == target
        assert spec["spec"]["maxReplicas"] <= partitions
        (metric,) = spec["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == "stream_trainer_consumer_lag_records"


@pytest.fixture(scope="module")
def crds(kube: ApiServer) -> Iterator[None]:
    """The CRDs the chart's custom resources need, Established: the Prometheus Operator's
    (ServiceMonitor, PrometheusRule) and KEDA's stand-ins (ScaledObject,
    TriggerAuthentication). Created unless there (test_search_jobs.py may run first)."""
    documents = _crd_documents(kube)
    for document in documents:
        _create(kube, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", document)
    for document in documents:
        name = document["metadata"]["name"]
        deadline = time.monotonic() + 30
        while True:
            crd = kube.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            ).body
            crd_conditions = conditions(crd)
            if crd_conditions.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"CRD {name} not Established: {crd_conditions}"
            time.sleep(0.2)
    yield


def test_restricted_namespace_rejects_a_pod_without_the_charts_security_context(
    kube: ApiServer,
) -> None:
    """Control: admission enforces ``restricted`` here, so the passes below mean something."""
    namespace = make_namespace(kube, "st-control")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "stream-trainer:test"}]},
    }
    with pytest.raises(ApiError) as rejected:
        dry_run_pod(kube, namespace, pod)
    assert rejected.value.status == 403
    message = json.loads(rejected.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "runAsNonRoot != true" in message


@pytest.mark.parametrize("case", CASES)
def test_install_then_uninstall(kube: ApiServer, crds: None, case: str) -> None:
    namespace = make_namespace(kube, f"st-{case.removesuffix('-values.yaml')}")
    make_prerequisites(kube, namespace, case)

    started = time.monotonic()
    installed = kube.helm("install", RELEASE, str(CHART_DIR), "-n", namespace, *helm_args(case))
    install_s = time.monotonic() - started
    assert_no_warnings(installed.stderr)
    assert "STATUS: deployed" in installed.stdout

    expected = expected_kinds(case)
    assert live_kinds(kube, namespace) == expected
    for doc in manifest_objects(kube, namespace):
        assert kube.exists(_path(doc["kind"], namespace, doc["metadata"]["name"])), doc["kind"]
    assert_pod_template_is_restricted(kube, namespace)
    # The `helm test` pod is a hook (not stored until `helm test`): the same check.
    hooks = [
        d
        for d in yaml.safe_load_all(kube.helm("get", "hooks", RELEASE, "-n", namespace).stdout)
        if d
    ]
    assert [h["kind"] for h in hooks] == ["Pod"]
    assert dry_run_pod(kube, namespace, hooks[0]) == []

    workload = workload_of(kube, namespace)
    values = _values(case)
    partition = _get(values, "config.model.scope", "global") == "partition"
    autoscaled = "ScaledObject" in expected or "HorizontalPodAutoscaler" in expected
    # With an autoscaler the chart leaves replicas out: the API server's default (1) until
    # the autoscaler (none runs here) sets it.
    replicas = 1 if autoscaled else _get(values, "replicaCount", 1)
    assert workload["spec"]["replicas"] == replicas
    if partition and workload["kind"] == "Deployment":
        # Members as the API server stored them: a new one joins before an old one leaves.
        assert workload["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    elif replicas > 1 and workload["kind"] == "Deployment":
        # Hot standbys: one pod at a time, never an extra one.
        assert workload["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    if "PodDisruptionBudget" in expected:
        budget = kube.request("GET", _path("PodDisruptionBudget", namespace, FULLNAME)).body
        assert budget["spec"]["maxUnavailable"] == 1
    if autoscaled:
        assert_autoscaler_stored(kube, namespace, values, workload)
    if workload["kind"] == "StatefulSet":
        # Its claims are the controller's, not helm's: the API server keeps the chart's
        # retention policy, so they outlive the StatefulSet too (none exist here).
        policy = workload["spec"]["persistentVolumeClaimRetentionPolicy"]
        assert policy == {"whenDeleted": "Retain", "whenScaled": "Retain"}

    started = time.monotonic()
    removed = kube.helm("uninstall", RELEASE, "-n", namespace)
    uninstall_s = time.monotonic() - started
    left = live_kinds(kube, namespace)
    if "PersistentVolumeClaim" in expected:
        # Checkpoints and model versions outlive the release (persistence.retainOnUninstall).
        assert left == {"PersistentVolumeClaim": 1}
        assert "kept due to the resource policy" in removed.stdout
        claim_path = _path("PersistentVolumeClaim", namespace, FULLNAME)
        claim = kube.request("GET", claim_path).body
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        # A reinstall under the same name adopts the kept claim: training resumes from it.
        kube.helm("install", RELEASE, str(CHART_DIR), "-n", namespace, *helm_args(case))
        readopted = kube.request("GET", claim_path).body["metadata"]["uid"]
        assert readopted == claim["metadata"]["uid"]
        kube.helm("uninstall", RELEASE, "-n", namespace)
        assert live_kinds(kube, namespace) == {"PersistentVolumeClaim": 1}
    else:
        assert left == {}
    print(
        f"\nkube {case}: installed {sum(expected.values())} objects "
        f"{dict(sorted(expected.items()))} in {install_s:.2f} s, pod template restricted-ok, "
        f"uninstalled in {uninstall_s:.2f} s, left: {left or 'nothing'}"
        + (" (reinstall adopted it)" if left else ""),
        file=sys.stderr,
    )


def test_upgrade_through_every_values_file_then_rollback_then_uninstall(
    kube: ApiServer, crds: None
) -> None:
    namespace = make_namespace(kube, "st-upgrade")
    for case in CASES:
        make_prerequisites(kube, namespace, case)

    timings: list[str] = []
    started = time.monotonic()
    kube.helm("install", RELEASE, str(CHART_DIR), "-n", namespace)
    timings.append(f"install default {time.monotonic() - started:.2f} s")
    claim_path = _path("PersistentVolumeClaim", namespace, FULLNAME)
    claim_uid = kube.request("GET", claim_path).body["metadata"]["uid"]
    kept_claim = False
    for case in VALUES_FILES:
        started = time.monotonic()
        # --history-max 0: helm keeps 10 revisions by default, fewer than this chain has.
        upgraded = kube.helm(
            "upgrade",
            RELEASE,
            str(CHART_DIR),
            "-n",
            namespace,
            "--history-max",
            "0",
            *helm_args(case),
        )
        timings.append(f"upgrade -> {case} {time.monotonic() - started:.2f} s")
        assert_no_warnings(upgraded.stderr)
        expected = expected_kinds(case)
        live = live_kinds(kube, namespace)
        # A claim dropped from the release by an upgrade is kept (resource policy), and a
        # later revision that renders it again adopts the same object: the data stays.
        kept_claim = kept_claim or "PersistentVolumeClaim" in live
        if kept_claim and "PersistentVolumeClaim" not in expected:
            expected = {**expected, "PersistentVolumeClaim": 1}
        assert live == expected, case
        assert_pod_template_is_restricted(kube, namespace)

    history = yaml.safe_load(kube.helm("history", RELEASE, "-n", namespace, "-o", "yaml").stdout)
    assert [h["revision"] for h in history] == list(range(1, len(CASES) + 1))
    assert history[-1]["status"] == "deployed"

    # Back to revision 2 (the first values file): its objects return, later ones go.
    started = time.monotonic()
    kube.helm("rollback", RELEASE, "2", "-n", namespace)
    timings.append(f"rollback -> 2 ({VALUES_FILES[0]}) {time.monotonic() - started:.2f} s")
    expected = expected_kinds(VALUES_FILES[0])
    expected.setdefault("PersistentVolumeClaim", 1)  # kept from revision 1
    assert live_kinds(kube, namespace) == expected
    assert_pod_template_is_restricted(kube, namespace)
    status = yaml.safe_load(kube.helm("status", RELEASE, "-n", namespace, "-o", "yaml").stdout)
    assert status["version"] == len(CASES) + 1
    assert status["info"]["description"] == "Rollback to 2"

    started = time.monotonic()
    kube.helm("uninstall", RELEASE, "-n", namespace)
    timings.append(f"uninstall {time.monotonic() - started:.2f} s")
    assert live_kinds(kube, namespace) == {"PersistentVolumeClaim": 1}
    # Through every revision the checkpoint claim was the same object (kept, re-adopted).
    assert kube.request("GET", claim_path).body["metadata"]["uid"] == claim_uid
    print(f"\nkube upgrade chain: {'; '.join(timings)}", file=sys.stderr)


def test_one_pod_to_standbys_and_back(kube: ApiServer, crds: None) -> None:
    """Scaling a remote-store release out to standbys and back in is an ordinary upgrade:
    the API server takes the strategy change both ways (Recreate <-> RollingUpdate with
    maxSurge 0; a Recreate Deployment must not keep a rollingUpdate block) and the budget
    comes and goes with the standbys."""
    namespace = make_namespace(kube, "st-standby-scale")
    make_prerequisites(kube, namespace, "standby-values.yaml")
    one_pod = ["-f", str(CHART_DIR / "ci" / "object-store-values.yaml")]
    budget = _path("PodDisruptionBudget", namespace, FULLNAME)

    kube.helm("install", RELEASE, str(CHART_DIR), "-n", namespace, *one_pod)
    assert workload_of(kube, namespace)["spec"]["strategy"] == {"type": "Recreate"}
    assert not kube.exists(budget)

    out = kube.helm(
        "upgrade", RELEASE, str(CHART_DIR), "-n", namespace, *helm_args("standby-values.yaml")
    )
    assert_no_warnings(out.stderr)
    spec = workload_of(kube, namespace)["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    assert kube.exists(budget)

    out = kube.helm("upgrade", RELEASE, str(CHART_DIR), "-n", namespace, *one_pod)
    assert_no_warnings(out.stderr)
    spec = workload_of(kube, namespace)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert not kube.exists(budget)
    kube.helm("uninstall", RELEASE, "-n", namespace)
    assert live_kinds(kube, namespace) == {}


def test_partition_members_to_keda_to_hpa_and_back(kube: ApiServer, crds: None) -> None:
    """Partition scope as ordinary upgrades: three members, then KEDA (ScaledObject and
    TriggerAuthentication stored, replicas left to it), then the HPA instead (KEDA's objects
    go), then fixed members again; every step without an API-server warning. The control:
    the KEDA CRD's schema refuses what KEDA would (a number in a trigger's metadata, a field
    upstream does not have), so the stored ScaledObject passed a real check."""
    namespace = make_namespace(kube, "st-partition-scale")
    for case in ("partition-values.yaml", "keda-values.yaml", "hpa-values.yaml"):
        make_prerequisites(kube, namespace, case)
    steps: list[str] = []
    stored: dict[str, Any] = {}
    kube.helm(
        "install", RELEASE, str(CHART_DIR), "-n", namespace, *helm_args("partition-values.yaml")
    )
    for case in ("keda-values.yaml", "hpa-values.yaml", "partition-values.yaml"):
        started = time.monotonic()
        out = kube.helm("upgrade", RELEASE, str(CHART_DIR), "-n", namespace, *helm_args(case))
        steps.append(f"-> {case} {time.monotonic() - started:.2f} s")
        assert_no_warnings(out.stderr)
        assert live_kinds(kube, namespace) == expected_kinds(case), case
        assert_pod_template_is_restricted(kube, namespace)
        if case == "keda-values.yaml":
            assert_autoscaler_stored(kube, namespace, _values(case), workload_of(kube, namespace))
            stored = kube.request("GET", _path("ScaledObject", namespace, FULLNAME)).body
    spec = workload_of(kube, namespace)["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}

    # Control: the ScaledObject the chart rendered, altered the way a template slip would.
    base = {k: stored[k] for k in ("apiVersion", "kind", "spec")}
    base["metadata"] = {"name": "control"}
    numeric = json.loads(json.dumps(base))
    numeric["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 5
    unknown = json.loads(json.dumps(base))
    unknown["spec"]["maxReplicas"] = 5  # the HPA's name, not KEDA's
    for bad, says in ((numeric, "lagThreshold"), (unknown, "maxReplicas")):
        with pytest.raises(ApiError) as refused:
            kube.request(
                "POST",
                _path("ScaledObject", namespace),
                bad,
                params={"dryRun": "All", "fieldValidation": "Strict"},
            )
        assert refused.value.status in (400, 422), refused.value.body
        assert says in refused.value.body
    accepted = kube.request(
        "POST",
        _path("ScaledObject", namespace),
        base,
        params={"dryRun": "All", "fieldValidation": "Strict"},
    )
    assert accepted.status == 201 and accepted.warnings == []
    kube.helm("uninstall", RELEASE, "-n", namespace)
    assert live_kinds(kube, namespace) == {}
    print(f"\nkube partition scale: {'; '.join(steps)}", file=sys.stderr)
