"""A real Kubernetes API server (etcd + kube-apiserver) and the real ``helm`` CLI.

No cluster and no download site is reachable from CI, so everything is built from the
Go module proxy once and cached under
``${STREAM_TRAINER_CACHE:-~/.cache/stream-trainer}/kube/<KUBE_VERSION>/``:

1. ``kube-apiserver`` from ``k8s.io/kubernetes``. Its go.mod points every ``k8s.io/*``
   staging module at ``./staging/src/...``, which the module zip does not carry: a tiny
   module requires ``k8s.io/kubernetes`` and replaces each of those with the published
   ``k8s.io/*`` module of the same release (``v0.X.Y`` for ``v1.X.Y``). The same
   ``go build`` makes ``kubelet``, ``kube-scheduler``, ``kube-controller-manager`` and
   ``kube-proxy`` for the single node (tests/kube/node_env.py): they share most packages,
   so they add about a third to the API server's compile (cold: 1.7 min on 4.6 min).
   Also a static ``pause`` binary (the pod sandbox; registry.k8s.io is not reachable).
2. ``helm`` from ``helm.sh/helm/v3``.
3. The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs, copied from the
   operator's Go module (``example/prometheus-operator-crd``).

Go's build and module caches live under ``.../stream-trainer/go`` so a rebuild after a
version bump reuses them. etcd is Debian's ``etcd-server`` (.ci/run installs it).

:class:`ApiServer` starts etcd and kube-apiserver on free loopback ports with their data
in a temporary folder (serving certificate, admin client certificate and service-account
keys made by ``openssl``; admission on, Pod Security among it), waits for ``/readyz`` and
writes a kubeconfig; :meth:`ApiServer.stop` stops both by pid. Command line::

    python -m tests.kube.kube_env build      # build/copy what is missing, print timings
    python -m tests.kube.kube_env run        # start, print the kubeconfig path, wait for ^C
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

KUBE_VERSION = "v1.36.3"
STAGING_VERSION = "v0.36.3"  # the published k8s.io/* modules of the same release
HELM_VERSION = "v3.21.4"
HELM_K8S_MINOR = "1.36"  # the k8s.io/* modules helm v3.21.4 builds with (v0.36.x)
PROM_OPERATOR_VERSION = "v0.85.0"
PROM_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator"
CRD_FILES = (
    "monitoring.coreos.com_servicemonitors.yaml",
    "monitoring.coreos.com_prometheusrules.yaml",
)
# Built from k8s.io/kubernetes in one `go build`: the API server, and what a single node
# needs to run pods (tests/kube/node_env.py).
KUBE_COMMANDS = (
    "kube-apiserver", "kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy",
)  # fmt: skip
SERVICE_CIDR = "10.96.0.0/16"
# Plugins switched on explicitly (PodSecurity is the one the tests rely on).
ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,DefaultStorageClass,"
    "ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
    "ValidatingAdmissionPolicy"
)


class KubeEnvError(Exception):
    """A build or start step failed; the message names the step and the tool's output."""


def cache_root() -> Path:
    """``$STREAM_TRAINER_CACHE`` (default ``~/.cache/stream-trainer``)."""
    env = os.environ.get("STREAM_TRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stream-trainer"


def kube_dir() -> Path:
    """Where the binaries and CRDs of :data:`KUBE_VERSION` are cached."""
    return cache_root() / "kube" / KUBE_VERSION


def _go_env() -> dict[str, str]:
    go = cache_root() / "go"
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(go / "mod"),
        GOCACHE=str(go / "build"),
        GOFLAGS="-trimpath -mod=mod -buildvcs=false",
    )
    return env


def _run(args: Sequence[str], step: str, cwd: Path | None = None) -> str:
    """Run a build command; a failure raises with the step and the output's tail."""
    result = subprocess.run(
        list(args), cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise KubeEnvError(f"{step} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def _download(module: str, version: str) -> dict[str, str]:
    """``go mod download -json`` of one module: its Dir, GoMod, ... paths."""
    out = _run(["go", "mod", "download", "-json", f"{module}@{version}"], f"download {module}")
    info: dict[str, str] = json.loads(out)
    if "Error" in info:
        raise KubeEnvError(f"download {module}@{version}: {info['Error']}")
    return info


def staging_go_mod(kubernetes_go_mod: str) -> str:
    """The build module's go.mod: each ``=> ./staging`` replace pointed at the published module."""
    replaces = []
    for line in kubernetes_go_mod.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "=>" and parts[2].startswith("./staging/"):
            replaces.append(f"\t{parts[0]} => {parts[0]} {STAGING_VERSION}")
    if not replaces:
        raise KubeEnvError("k8s.io/kubernetes go.mod has no ./staging replaces to rewrite")
    return (
        "module streamtrainer.local/kubebuild\n\ngo 1.26.0\n\n"
        f"require k8s.io/kubernetes {KUBE_VERSION}\n\nreplace (\n" + "\n".join(replaces) + "\n)\n"
    )


@dataclass
class BuildTimings:
    """Seconds per artifact of one :func:`build` (absent when cached)."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)

    def summary(self) -> str:
        built = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) or "nothing built"
        return f"{built}; cached: {', '.join(self.cached) or 'none'}"


@dataclass(frozen=True)
class Tools:
    """Paths of the built binaries and the CRD files."""

    kube_apiserver: Path
    helm: Path
    crds: tuple[Path, ...]
    kubelet: Path
    kube_scheduler: Path
    kube_controller_manager: Path
    kube_proxy: Path
    pause: Path


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock so two sessions never build into the same folder at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _go_build(packages: Sequence[str], bin_dir: Path, version_flags: str, cwd: Path) -> None:
    """One ``go build`` (stripped, with ``version_flags``) of ``packages`` into ``bin_dir``,
    each binary named after its package's last element. Built into a scratch folder and
    renamed, so a killed build leaves no binary; one invocation compiles the packages the
    binaries share once."""
    scratch = bin_dir / ".build"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    names = [package.rsplit("/", 1)[-1] for package in packages]
    _run(
        ["go", "build", f"-ldflags=-s -w {version_flags}", "-o", f"{scratch}/", *packages],
        f"go build {' '.join(names)}",
        cwd=cwd,
    )
    for name in names:
        os.replace(scratch / name, bin_dir / name)
    scratch.rmdir()


# A pod sandbox ("pause") process: PID 1 of the pod's namespaces, sleeping until asked to
# stop. No registry is reachable for registry.k8s.io/pause, so it is built here.
PAUSE_GO = """package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tstop := make(chan os.Signal, 1)
\tsignal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
\t<-stop
}
"""


def build(timings: BuildTimings | None = None, log: IO[str] | None = None) -> Tools:
    """Build or copy whatever is not cached yet; return the paths. Raises KubeEnvError."""
    timings = timings or BuildTimings()
    if shutil.which("go") is None:
        raise KubeEnvError("go not found: the Go toolchain builds kube-apiserver and helm")
    root = kube_dir()
    bin_dir = root / "bin"
    helm = bin_dir / "helm"
    crd_dir = root / "crds"
    with _locked(root):
        bin_dir.mkdir(exist_ok=True)
        missing = [name for name in KUBE_COMMANDS if not (bin_dir / name).is_file()]
        timings.cached.extend(name for name in KUBE_COMMANDS if name not in missing)
        if missing:
            _say(log, f"building {' '.join(missing)} {KUBE_VERSION} (about 12 min on 2 cores)")
            started = time.monotonic()
            go_mod = Path(_download("k8s.io/kubernetes", KUBE_VERSION)["GoMod"]).read_text()
            src = root / "src-kube-apiserver"
            src.mkdir(exist_ok=True)
            (src / "go.mod").write_text(staging_go_mod(go_mod))
            # The version the server reports (/version): helm checks the chart's kubeVersion
            # against it, and without these it is v0.0.0-master.
            major, minor = KUBE_VERSION.removeprefix("v").split(".")[:2]
            version_flag = " ".join(
                f"-X k8s.io/component-base/version.{var}"
                for var in (f"gitVersion={KUBE_VERSION}", f"gitMajor={major}",
                            f"gitMinor={minor}", "gitTreeState=clean")
            )  # fmt: skip
            packages = [f"k8s.io/kubernetes/cmd/{name}" for name in missing]
            _go_build(packages, bin_dir, version_flag, src)
            timings.seconds[" + ".join(missing)] = time.monotonic() - started
        pause = bin_dir / "pause"
        if pause.is_file():
            timings.cached.append("pause")
        else:
            started = time.monotonic()
            src = root / "src-pause"
            src.mkdir(exist_ok=True)
            (src / "go.mod").write_text("module streamtrainer.local/pause\n\ngo 1.26.0\n")
            (src / "main.go").write_text(PAUSE_GO)
            # No cgo and no net package: a static binary, as a FROM-scratch image needs.
            _go_build(["streamtrainer.local/pause"], bin_dir, "", src)
            timings.seconds["pause"] = time.monotonic() - started
        if helm.is_file():
            timings.cached.append("helm")
        else:
            _say(log, f"building helm {HELM_VERSION} (about 3 min)")
            started = time.monotonic()
            src = root / "src-helm"
            src.mkdir(exist_ok=True)
            (src / "go.mod").write_text(
                "module streamtrainer.local/helmbuild\n\ngo 1.26.0\n\n"
                f"require helm.sh/helm/v3 {HELM_VERSION}\n"
            )
            # What helm's Makefile sets: its version, and the Kubernetes version it assumes
            # when no server is asked (`helm template`/`lint`; default 1.20 otherwise).
            major, minor = HELM_K8S_MINOR.split(".")
            version_flag = " ".join(
                f"-X helm.sh/helm/v3/{var}"
                for var in (
                    f"internal/version.version={HELM_VERSION}",
                    f"pkg/lint/rules.k8sVersionMajor={major}",
                    f"pkg/lint/rules.k8sVersionMinor={minor}",
                    f"pkg/chartutil.k8sVersionMajor={major}",
                    f"pkg/chartutil.k8sVersionMinor={minor}",
                )
            )
            _go_build(["helm.sh/helm/v3/cmd/helm"], bin_dir, version_flag, src)
            timings.seconds["helm"] = time.monotonic() - started
        crds = tuple(crd_dir / name for name in CRD_FILES)
        if all(path.is_file() for path in crds):
            timings.cached.append("CRDs")
        else:
            started = time.monotonic()
            module = Path(_download(PROM_OPERATOR_MODULE, PROM_OPERATOR_VERSION)["Dir"])
            crd_dir.mkdir(exist_ok=True)
            for name in CRD_FILES:
                source = module / "example" / "prometheus-operator-crd" / name
                if not source.is_file():
                    raise KubeEnvError(
                        f"{name} not in {PROM_OPERATOR_MODULE}@{PROM_OPERATOR_VERSION}"
                    )
                shutil.copyfile(source, crd_dir / name)
            timings.seconds["CRDs"] = time.monotonic() - started
    return Tools(
        kube_apiserver=bin_dir / "kube-apiserver",
        helm=helm,
        crds=crds,
        kubelet=bin_dir / "kubelet",
        kube_scheduler=bin_dir / "kube-scheduler",
        kube_controller_manager=bin_dir / "kube-controller-manager",
        kube_proxy=bin_dir / "kube-proxy",
        pause=pause,
    )


def _say(log: IO[str] | None, message: str) -> None:
    if log is not None:
        print(f"kube_env: {message}", file=log, flush=True)


def free_port() -> int:
    """A free loopback TCP port (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KubeEnvError(f"openssl {args[0]} failed: {result.stderr.strip()[-800:]}")


def make_pki(folder: Path) -> None:
    """CA, serving cert (127.0.0.1/localhost), admin client cert, service-account keys."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=stream-trainer-test-ca",
             cwd=folder)  # fmt: skip
    ext = folder / "serving.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    client_ext = folder / "client.ext"
    client_ext.write_text("extendedKeyUsage=clientAuth\n")
    # Admin: the system:masters group passes every authorizer (RBAC included).
    for name, subject, extfile in (
        ("serving", "/CN=kube-apiserver", ext),
        ("admin", "/O=system:masters/CN=stream-trainer-admin", client_ext),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subject, cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", str(extfile),
                 "-out", f"{name}.crt", cwd=folder)  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)


class ApiError(KubeEnvError):
    """The API server answered a request with an error status."""

    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:600]}")
        self.status = status
        self.body = body


def conditions(obj: Mapping[str, Any]) -> dict[str, str]:
    """An object's status conditions as ``{type: status}``. A just-created object may carry
    ``status: {conditions: null}`` (a CRD before the controller has looked at it): empty."""
    status = obj.get("status") or {}
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


@dataclass
class Response:
    """A decoded API answer with the ``Warning`` headers it carried."""

    status: int
    body: dict[str, Any]
    warnings: list[str]


class ApiServer:
    """etcd + kube-apiserver on loopback, admin access by client certificate."""

    def __init__(self, tools: Tools, log: IO[str] | None = None) -> None:
        self.tools = tools
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="stream-trainer-kube-"))
        self.pki = self.workdir / "pki"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.port = 0
        self.start_seconds = 0.0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._ssl: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        """Start etcd and kube-apiserver; return once ``/readyz`` answers ok."""
        etcd = shutil.which("etcd")
        if etcd is None:
            raise KubeEnvError("etcd not found: install Debian's etcd-server (.ci/run does)")
        started = time.monotonic()
        make_pki(self.pki)
        client_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [etcd, "--name", "test", "--data-dir", str(self.workdir / "etcd"),
             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"test={peer_url}", "--log-level", "warn"],
        )  # fmt: skip
        self._poll(lambda: _http_ok(f"{etcd_url}/health"), timeout, "etcd /health")
        self.port = free_port()
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [str(self.tools.kube_apiserver),
             "--etcd-servers", etcd_url,
             "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
             "--secure-port", str(self.port), "--cert-dir", str(self.workdir / "certs"),
             "--tls-cert-file", str(pki / "serving.crt"),
             "--tls-private-key-file", str(pki / "serving.key"),
             "--client-ca-file", str(pki / "ca.crt"),
             "--service-account-issuer", "https://kubernetes.default.svc",
             "--service-account-key-file", str(pki / "sa.pub"),
             "--service-account-signing-key-file", str(pki / "sa.key"),
             "--service-cluster-ip-range", SERVICE_CIDR,
             "--authorization-mode", "RBAC",
             "--enable-admission-plugins", ADMISSION_PLUGINS,
             # A loopback address may not be an EndpointSlice endpoint: no reconciler.
             "--endpoint-reconciler-type", "none",
             "--allow-privileged=false"],
        )  # fmt: skip
        self._ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._ssl.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._poll(self._ready, timeout, "kube-apiserver /readyz")
        self._write_kubeconfig()
        self.start_seconds = time.monotonic() - started

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs.append(proc)

    def _poll(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    name = Path(str(proc.args[0])).name  # type: ignore[index]
                    tail = self.log_tail(name)
                    raise KubeEnvError(
                        f"{name} exited with {proc.returncode} before {what}:\n{tail}"
                    )
            if check():
                return
            time.sleep(0.2)
        raise KubeEnvError(f"{what} not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            url = f"{self.url}/readyz"
            with urllib.request.urlopen(url, context=self._ssl, timeout=5) as r:  # noqa: S310 - loopback
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, name: str = "kube-apiserver", lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(self.pki / "admin.crt"),
                "client-key": str(self.pki / "admin.key")}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }  # fmt: skip
        self.kubeconfig.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.kubeconfig.chmod(0o600)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop kube-apiserver then etcd (SIGTERM, SIGKILL after ``timeout``); remove data."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- a minimal REST client (no kubectl here) ------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Response:
        """One API call as admin; raises :class:`ApiError` on a status >= 400."""
        url = self.url + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=30) as answer:  # noqa: S310
                raw = answer.read().decode()
                warnings = answer.headers.get_all("Warning") or []
                return Response(answer.status, json.loads(raw) if raw else {}, warnings)
        except urllib.error.HTTPError as error:
            raise ApiError(
                error.code, error.read().decode(errors="replace"), method, path
            ) from None

    def exists(self, path: str) -> bool:
        try:
            self.request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The real helm CLI against this server, with its own cache/config/data folders."""
        home = self.workdir / "helm"
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            HELM_CACHE_HOME=str(home / "cache"),
            HELM_CONFIG_HOME=str(home / "config"),
            HELM_DATA_HOME=str(home / "data"),
        )
        result = subprocess.run(
            [str(self.tools.helm), *args], env=env, capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise KubeEnvError(
                f"helm {' '.join(args[:2])} failed ({result.returncode}):\n{result.stderr.strip()}"
            )
        return result


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback etcd
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kube.kube_env", description=__doc__)
    parser.add_argument("command", choices=["build", "run"])
    args = parser.parse_args(argv)
    timings = BuildTimings()
    started = time.monotonic()
    try:
        tools = build(timings, log=sys.stderr)
    except KubeEnvError as error:
        print(f"kube_env: {error}", file=sys.stderr)
        return 1
    print(f"kube_env: {timings.summary()} ({time.monotonic() - started:.0f} s) in {kube_dir()}")
    if args.command == "run":
        server = ApiServer(tools, log=sys.stderr)
        # ^C or SIGTERM (a background job ignores SIGINT) both end in server.stop().
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            server.start()
            print(
                f"KUBECONFIG={server.kubeconfig}  (started in {server.start_seconds:.1f} s)",
                flush=True,
            )
            with suppress(KeyboardInterrupt, SystemExit):
                signal.pause()
        except KubeEnvError as error:
            print(f"kube_env: {error}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
