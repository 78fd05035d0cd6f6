"""A single Kubernetes node next to :class:`~tests.kube.kube_env.ApiServer`: pods really run.

What runs (all on this machine, stopped by pid, nothing left behind):

- Debian's ``containerd`` (its CRI plugin) with its own root, state, socket and config in a
  temporary folder; Debian's ``runc`` and ``containernetworking-plugins`` (``bridge`` with
  ``host-local`` IPAM, ``loopback``) from ``/usr/lib/cni``.
- The sandbox image: the ``pause`` binary built by :func:`~tests.kube.kube_env.build`,
  packed here as a one-layer image archive (``docker save`` format) and imported with
  ``ctr -n k8s.io images import``. No registry is reachable.
- ``kubelet`` (cgroupfs driver; cgroup v1 allowed with ``failCgroupV1: false``; swap
  allowed), ``kube-scheduler``, ``kube-controller-manager`` and ``kube-proxy`` (iptables
  mode: Service ClusterIPs), all built from ``k8s.io/kubernetes`` with the API server and
  talking to it with its admin kubeconfig.
- Cluster DNS stand-in: :class:`ServiceDns`, a few lines answering
  ``<service>.<namespace>.svc.cluster.local`` with the Service's ClusterIP from the API
  (no CoreDNS build: it would add minutes of compile for one name lookup in `helm test`).

Pods get addresses on a bridge (:data:`BRIDGE`, :data:`POD_SUBNET`) whose gateway is this
host, so a pod reaches any address the host has (e.g. its primary address, see
:func:`host_address`) and the host reaches pod IPs directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from tests.container.docker_env import DockerEnv
from tests.kube.kube_env import (
    ApiError,
    ApiServer,
    KubeEnvError,
    Tools,
    conditions,
    free_port,
)

NODE_NAME = "stream-trainer-node"
BRIDGE = "st-cni0"
POD_SUBNET = "10.244.0.0/24"
PAUSE_IMAGE = "stream-trainer.local/pause:1"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
NAMESPACE = "k8s.io"  # containerd namespace the CRI plugin uses
CGROUP_ROOT = Path("/sys/fs/cgroup")
CLUSTER_DOMAIN = "cluster.local"
NETNS_DIR = Path("/run/netns")  # where containerd's CRI pins pod network namespaces
CNI_CACHE = Path("/var/lib/cni/results")  # libcni's cache of each attachment
# Fixed host paths the components create whatever their configured folders: the kubelet's
# device-plugin socket folder, libcni's cache. Removed at stop when they did not exist
# before start (NETNS_DIR too, only if empty; /run/containerd/s, the shims' socket folder
# that Docker's containerd shares, is left).
HOST_PATHS = (Path("/var/lib/kubelet"), Path("/var/lib/cni"))
SYSCTLS = tuple(
    Path("/proc/sys/net") / name
    for name in (
        "bridge/bridge-nf-call-iptables",
        "ipv4/conf/all/route_localnet",
        "netfilter/nf_conntrack_tcp_timeout_established",
        "netfilter/nf_conntrack_tcp_timeout_close_wait",
        "netfilter/nf_conntrack_max",
    )
)


class NodeEnvError(KubeEnvError):
    """A node component could not be set up or started; the message says which and why."""


def host_address() -> str:
    """The host's primary IPv4 address (source of its default route): reachable from pods
    through the bridge's gateway, unlike loopback, which is the pod's own."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("198.51.100.1", 9))  # no packet is sent: only the route is looked up
            address: str = probe.getsockname()[0]
    except OSError as error:
        raise NodeEnvError(f"no IPv4 default route to find the host's address: {error}") from None
    if address.startswith("127."):
        raise NodeEnvError("no non-loopback IPv4 address for pods to reach the host")
    return address


def image_archive(binary: Path, ref: str) -> bytes:
    """A one-layer image holding ``binary`` as ``/<name>`` (its entrypoint), in the
    ``docker save`` archive format that ``ctr images import`` reads."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        info = layer.gettarinfo(str(binary), arcname=binary.name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with binary.open("rb") as handle:
            layer.addfile(info, handle)
    layer_bytes = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": [f"/{binary.name}"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = diff_id.removeprefix("sha256:") + "/layer.tar"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [ref], "Layers": [layer_name]}]
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in ((layer_name, layer_bytes), (config_name, config),
                           ("manifest.json", manifest)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _containerd_config(work: Path) -> str:
    # The runc shim uses the cgroupfs driver (cgroup v1 host, no systemd as init).
    return f"""version = 2
root = "{work}/containerd/root"
state = "{work}/containerd/state"
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  # Root here lacks CAP_SYS_RESOURCE (a sandboxed VM): runc cannot lower oom_score_adj
  # (the sandbox asks for -998) and fails with "can't get final child's PID from pipe".
  # Clamp every container's value to containerd's own (0), as rootless setups do.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{work}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{work}/cni"
    max_conf_num = 1
"""


def _cni_conflist(work: Path) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "stream-trainer",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # pods only talk to this host
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(work / "cni-ipam"),
                },
            },
            {"type": "loopback"},
        ],
    }


def _kubelet_config(
    work: Path, api: ApiServer, healthz_port: int, port: int, dns: str
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This host has cgroup v1 (hybrid): kubelet 1.36 refuses it unless told not to.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        # Its default (-999) needs CAP_SYS_RESOURCE, which root lacks on this VM.
        "oomScoreAdj": 0,
        "containerRuntimeEndpoint": f"unix://{work}/containerd.sock",
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(api.pki / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "podLogsDir": str(work / "pod-logs"),
        "resolvConf": str(work / "resolv.conf"),
        "clusterDNS": [dns],
        "clusterDomain": CLUSTER_DOMAIN,
        # No thresholds to evict a test pod on a busy shared disk or in little free memory.
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "registerNode": True,
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
    }


class ServiceDns:
    """UDP DNS on ``address:53``: A records of ``<svc>.<ns>.svc.<CLUSTER_DOMAIN>`` (the
    Service's ClusterIP, looked up in the API per query); NXDOMAIN for any other name, an
    empty answer for other record types of a Service name. What CoreDNS's ``kubernetes``
    plugin answers for a ClusterIP Service, and nothing more."""

    def __init__(self, api: ApiServer, address: str) -> None:
        self.api = api
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self.sock.settimeout(0.5)
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="service-dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(1500)
            except TimeoutError:
                continue
            except OSError:
                return
            with suppress(OSError):
                answer = self.answer(query)
                if answer:
                    self.sock.sendto(answer, peer)

    def cluster_ip(self, name: str) -> str | None:
        suffix = f".svc.{CLUSTER_DOMAIN}"
        parts = name.removesuffix(suffix).split(".")
        if not name.endswith(suffix) or len(parts) != 2:
            return None
        try:
            service = self.api.request("GET", f"/api/v1/namespaces/{parts[1]}/services/{parts[0]}")
        except ApiError:
            return None
        ip: str | None = service.body["spec"].get("clusterIP")
        return ip

    def answer(self, query: bytes) -> bytes:
        """The response to one query message (empty when it cannot be parsed)."""
        if len(query) < 12:
            return b""
        ident, _flags, qdcount = struct.unpack("!HHH", query[:6])
        if qdcount != 1:
            return b""
        labels, at = [], 12
        while at < len(query) and query[at] != 0:
            length = query[at]
            labels.append(query[at + 1 : at + 1 + length].decode("ascii", "replace"))
            at += 1 + length
        question = query[12 : at + 5]
        if len(question) < at + 5 - 12:
            return b""
        qtype = struct.unpack("!H", query[at + 1 : at + 3])[0]
        name = ".".join(labels).lower()
        self.queries.append(name)
        ip = self.cluster_ip(name)
        if ip is None:
            return struct.pack("!HHHHHH", ident, 0x8183, 1, 0, 0, 0) + question  # NXDOMAIN
        if qtype != 1:  # not A: the name exists, no record of that type
            return struct.pack("!HHHHHH", ident, 0x8580, 1, 0, 0, 0) + question
        record = struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(ip)
        return struct.pack("!HHHHHH", ident, 0x8580, 1, 1, 0, 0) + question + record

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class Node:
    """containerd, kubelet, kube-scheduler, kube-controller-manager, kube-proxy and the DNS
    stand-in for ``api``; :meth:`stop` puts the host back as it found it."""

    def __init__(self, tools: Tools, api: ApiServer, log: IO[str] | None = None) -> None:
        self.tools = tools
        self.api = api
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="st-node-"))
        self.socket = self.workdir / "containerd.sock"
        self.start_seconds = 0.0
        self.address = host_address()
        self.dns: ServiceDns | None = None
        self._sysctls: dict[Path, str] = {}
        self._netns_before: set[str] = set()
        self._new_host_paths: list[Path] = []
        self._new_netns_dir = False
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- start --------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start everything; return once the Node is Ready. NodeEnvError otherwise."""
        for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
            if shutil.which(tool) is None:
                raise NodeEnvError(f"{tool} not found: install Debian's containerd and runc")
        if not (CNI_BIN_DIR / "bridge").is_file():
            raise NodeEnvError(
                f"{CNI_BIN_DIR}/bridge not found: install Debian's containernetworking-plugins"
            )
        if os.geteuid() != 0:
            raise NodeEnvError("containerd and kubelet need root")
        started = time.monotonic()
        work = self.workdir
        (work / "cni").mkdir()
        (work / "cni" / "10-stream-trainer.conflist").write_text(
            json.dumps(_cni_conflist(work), indent=2)
        )
        (work / "containerd.toml").write_text(_containerd_config(work))
        self._netns_before = _netns()
        self._new_host_paths = [path for path in HOST_PATHS if not path.exists()]
        self._new_netns_dir = not NETNS_DIR.exists()
        self._spawn("containerd", ["containerd", "--config", str(work / "containerd.toml")])
        self._poll(lambda: self.ctr("version", check=False).returncode == 0, 30, "containerd")
        self.import_image(image_archive(self.tools.pause, PAUSE_IMAGE))
        # Pods resolve names like the host does (no cluster DNS here).
        shutil.copyfile("/etc/resolv.conf", work / "resolv.conf")
        kubelet_config = work / "kubelet.json"
        kubelet_config.write_text(
            json.dumps(
                _kubelet_config(work, self.api, free_port(), free_port(), self.address), indent=2
            )
        )
        self._spawn(
            "kubelet",
            [str(self.tools.kubelet), "--config", str(kubelet_config),
             "--kubeconfig", str(self.api.kubeconfig), "--root-dir", str(work / "kubelet"),
             "--cert-dir", str(work / "kubelet-pki"), "--hostname-override", NODE_NAME,
             "--node-ip", self.address, "--v", "2"],
        )  # fmt: skip
        common = ["--kubeconfig", str(self.api.kubeconfig), "--leader-elect=false",
                  "--bind-address", "127.0.0.1"]  # fmt: skip
        self._spawn(
            "kube-scheduler",
            [str(self.tools.kube_scheduler), *common, "--secure-port", str(free_port()),
             "--authentication-kubeconfig", str(self.api.kubeconfig),
             "--authorization-kubeconfig", str(self.api.kubeconfig)],
        )  # fmt: skip
        self._spawn(
            "kube-controller-manager",
            [str(self.tools.kube_controller_manager), *common,
             "--secure-port", str(free_port()),
             "--authentication-kubeconfig", str(self.api.kubeconfig),
             "--authorization-kubeconfig", str(self.api.kubeconfig),
             "--service-account-private-key-file", str(self.api.pki / "sa.key"),
             "--root-ca-file", str(self.api.pki / "ca.crt"),
             "--use-service-account-credentials=false"],
        )  # fmt: skip
        # Host settings kube-proxy or this node change are restored by stop().
        self._sysctls = {path: path.read_text() for path in SYSCTLS if path.is_file()}
        # Pod-to-ClusterIP traffic is DNAT-ed back onto the same bridge: its replies must
        # pass iptables too (Docker sets the same).
        Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1")
        self._spawn(
            "kube-proxy",
            [str(self.tools.kube_proxy), "--kubeconfig", str(self.api.kubeconfig),
             "--hostname-override", NODE_NAME, "--proxy-mode", "iptables",
             "--cluster-cidr", POD_SUBNET,
             # Leave the host's conntrack limits and route_localnet as they are.
             "--conntrack-max-per-core", "0", "--conntrack-tcp-timeout-established", "0",
             "--conntrack-tcp-timeout-close-wait", "0", "--iptables-localhost-nodeports=false",
             "--healthz-bind-address", f"127.0.0.1:{free_port()}",
             "--metrics-bind-address", f"127.0.0.1:{free_port()}"],
        )  # fmt: skip
        self.dns = ServiceDns(self.api, self.address)
        self._poll(self.node_ready, timeout, f"Node {NODE_NAME} Ready")
        self.start_seconds = time.monotonic() - started

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self._procs[name] = proc

    def _poll(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise NodeEnvError(
                        f"{name} exited with {proc.returncode} before {what}:\n"
                        + self.log_tail(name)
                    )
            if check():
                return
            time.sleep(0.5)  # polling interval of a bounded wait
        raise NodeEnvError(f"{what} not within {timeout:.0f} s:\n{self.log_tail('kubelet')}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def node_ready(self) -> bool:
        try:
            node = self.api.request("GET", f"/api/v1/nodes/{NODE_NAME}").body
        except ApiError:
            return False
        return conditions(node).get("Ready") == "True"

    # -- containerd ---------------------------------------------------------------------

    def ctr(
        self, *args: str, data: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr`` against this containerd, in the CRI plugin's namespace."""
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "-n", NAMESPACE, *args],
            input=data, capture_output=True, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise NodeEnvError(f"ctr {' '.join(args[:2])} failed: {result.stderr.decode()[-800:]}")
        return result

    def import_image(self, archive: bytes | Path) -> None:
        """Import a ``docker save`` archive (bytes or a file) for the kubelet to use."""
        if isinstance(archive, Path):
            self.ctr("images", "import", str(archive))
        else:
            self.ctr("images", "import", "-", data=archive)

    def import_docker_image(self, docker: DockerEnv, ref: str) -> None:
        """``docker save ref | ctr images import -``: the image as the kubelet names it
        (``stream-trainer:test`` becomes ``docker.io/library/stream-trainer:test``)."""
        assert docker.client is not None
        save = subprocess.Popen(
            [docker.client, "--host", docker.host, "save", ref], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert save.stdout is not None
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "-n", NAMESPACE, "images", "import", "-"],
            stdin=save.stdout, capture_output=True, check=False,
        )  # fmt: skip
        save.stdout.close()
        _, save_err = save.communicate()
        if save.returncode != 0 or result.returncode != 0:
            raise NodeEnvError(
                f"docker save {ref} | ctr images import failed: "
                f"{save_err.decode()[-400:]} {result.stderr.decode()[-400:]}"
            )

    # -- stop ---------------------------------------------------------------------------

    def stop(self, timeout: float = 60.0) -> None:
        """Delete every pod (the kubelet stops them), stop the components by pid, then
        remove what outlives them: containers, shims, mounts, the bridge, pod cgroups."""
        if self._procs.get("kubelet") and self._procs["kubelet"].poll() is None:
            with suppress(ApiError, OSError):
                self._delete_all_pods(timeout)
        if self.dns is not None:
            self.dns.stop()
            self.dns = None
        for name in ("kube-proxy", "kube-controller-manager", "kube-scheduler", "kubelet"):
            proc = self._procs.get(name)
            if proc is not None:
                _terminate(proc, 20.0)
        if "kube-proxy" in self._procs:
            # Its iptables chains outlive it: `--cleanup` removes them.
            subprocess.run([str(self.tools.kube_proxy), "--cleanup"], capture_output=True,
                           check=False)  # fmt: skip
        if "containerd" in self._procs and self._procs["containerd"].poll() is None:
            self._remove_containers()
        proc = self._procs.get("containerd")
        if proc is not None:
            _terminate(proc, 20.0)
        self._procs.clear()
        self._kill_shims()
        self._unmount_under(self.workdir)
        # A sandbox torn down while containerd stops can leave its pinned namespace.
        for name in _netns() - self._netns_before:
            if name.startswith("cni-"):
                subprocess.run(["umount", str(NETNS_DIR / name)], capture_output=True,
                               check=False)  # fmt: skip
                with suppress(OSError):
                    (NETNS_DIR / name).unlink()
        # libcni's cache entries of this node's network (its name) and their loopbacks.
        if CNI_CACHE.is_dir():
            ours = [p for p in CNI_CACHE.iterdir() if p.name.startswith("stream-trainer-")]
            ids = {p.name.removeprefix("stream-trainer-").rsplit("-", 1)[0] for p in ours}
            for entry in CNI_CACHE.iterdir():
                if entry in ours or any(entry.name == f"cni-loopback-{i}-lo" for i in ids):
                    with suppress(OSError):
                        entry.unlink()
        for path in self._new_host_paths:
            shutil.rmtree(path, ignore_errors=True)
        if self._new_netns_dir:
            with suppress(OSError):
                NETNS_DIR.rmdir()
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        remove_kubelet_chains()
        for path, value in self._sysctls.items():
            with suppress(OSError):
                path.write_text(value)
        _remove_cgroups("kubepods")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _delete_all_pods(self, timeout: float) -> None:
        pods = self.api.request("GET", "/api/v1/pods").body["items"]
        for pod in pods:
            meta = pod["metadata"]
            with suppress(ApiError, OSError):
                self.api.request(
                    "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                    {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 5},
                )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            if not left:
                return
            time.sleep(0.5)  # polling interval of a bounded wait

    def _remove_containers(self) -> None:
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.decode().split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            for _ in range(20):
                if self.ctr("tasks", "delete", task, check=False).returncode == 0:
                    break
                time.sleep(0.25)  # polling interval of a bounded wait
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.decode().split():
            self.ctr("containers", "delete", container, check=False)

    def _kill_shims(self) -> None:
        """Shims of this containerd (their command line names its socket)."""
        marker = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and marker in cmdline:
                with suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)

    @staticmethod
    def _unmount_under(folder: Path) -> None:
        prefix = str(folder)
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _netns() -> set[str]:
    return {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()


def remove_kubelet_chains() -> None:
    """The iptables chains the kubelet makes and never removes (KUBE-FIREWALL and its
    INPUT/OUTPUT jumps, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT), IPv4 and IPv6."""

    def run(tool: str, *args: str) -> bool:
        done = subprocess.run([tool, "-w", "5", *args], capture_output=True, check=False)
        return done.returncode == 0

    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for chain in ("INPUT", "OUTPUT"):
            for _ in range(10):  # one jump each, unless something added it twice
                if not run(tool, "-t", "filter", "-D", chain, "-j", "KUBE-FIREWALL"):
                    break
        run(tool, "-t", "filter", "-F", "KUBE-FIREWALL")
        run(tool, "-t", "filter", "-X", "KUBE-FIREWALL")
        for table in ("mangle", "nat", "filter"):
            run(tool, "-t", table, "-X", "KUBE-KUBELET-CANARY")
        run(tool, "-t", "mangle", "-X", "KUBE-IPTABLES-HINT")


def _remove_cgroups(name: str) -> None:
    """rmdir the kubelet's ``/<name>`` cgroup tree in every v1 hierarchy, deepest first."""
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / name
        if not top.is_dir():
            continue
        folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for folder in [*folders, top]:
            with suppress(OSError):
                folder.rmdir()


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
