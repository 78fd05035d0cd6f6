"""A single Kubernetes node next to :class:`~tests.kube.kube_env.ApiServer`: pods really run.

What runs (all on this machine, stopped by pid, nothing left behind):

- Debian's ``containerd`` (its CRI plugin) with its own root, state, socket and config in a
  temporary folder; Debian's ``runc`` and ``containernetworking-plugins`` (``bridge`` with
  ``host-local`` IPAM, ``loopback``) from ``/usr/lib/cni``.
- The sandbox image: the ``pause`` binary built by :func:`~tests.kube.kube_env.build`,
  packed here as a one-layer image archive (``docker save`` format) and imported with
  ``ctr -n k8s.io images import``. No registry is reachable.
- ``kubelet`` (cgroupfs driver; cgroup v1 allowed with ``failCgroupV1: false``; swap
  allowed), ``kube-scheduler`` and ``kube-controller-manager``, all built from
  ``k8s.io/kubernetes`` with the API server and talking to it with its admin kubeconfig.

Pods get addresses on a bridge (:data:`BRIDGE`, :data:`POD_SUBNET`) whose gateway is this
host, so a pod reaches any address the host has (e.g. its primary address, see
:func:`host_address`) and the host reaches pod IPs directly. There is no kube-proxy and no
cluster DNS: a Service's name does not resolve in a pod.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from tests.container.docker_env import DockerEnv
from tests.kube.kube_env import ApiError, ApiServer, KubeEnvError, Tools, free_port

NODE_NAME = "stream-trainer-node"
BRIDGE = "st-cni0"
POD_SUBNET = "10.244.0.0/24"
PAUSE_IMAGE = "stream-trainer.local/pause:1"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
NAMESPACE = "k8s.io"  # containerd namespace the CRI plugin uses
CGROUP_ROOT = Path("/sys/fs/cgroup")


class NodeEnvError(KubeEnvError):
    """A node component could not be set up or started; the message says which and why."""


def host_address() -> str:
    """The host's primary IPv4 address (source of its default route): reachable from pods
    through the bridge's gateway, unlike loopback, which is the pod's own."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # no packet is sent: only the route is looked up
        address: str = probe.getsockname()[0]
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


def _kubelet_config(work: Path, api: ApiServer, healthz_port: int, port: int) -> dict[str, Any]:
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
        # No thresholds to evict a test pod on a busy shared disk or in little free memory.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%"},  # fmt: skip
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "registerNode": True,
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
    }


class Node:
    """containerd + kubelet + kube-scheduler + kube-controller-manager for ``api``."""

    def __init__(self, tools: Tools, api: ApiServer, log: IO[str] | None = None) -> None:
        self.tools = tools
        self.api = api
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="st-node-"))
        self.socket = self.workdir / "containerd.sock"
        self.start_seconds = 0.0
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
        self._spawn("containerd", ["containerd", "--config", str(work / "containerd.toml")])
        self._poll(lambda: self.ctr("version", check=False).returncode == 0, 30, "containerd")
        self.import_image(image_archive(self.tools.pause, PAUSE_IMAGE))
        # Pods resolve names like the host does (no cluster DNS here).
        shutil.copyfile("/etc/resolv.conf", work / "resolv.conf")
        kubelet_config = work / "kubelet.json"
        kubelet_config.write_text(
            json.dumps(_kubelet_config(work, self.api, free_port(), free_port()), indent=2)
        )
        self._spawn(
            "kubelet",
            [str(self.tools.kubelet), "--config", str(kubelet_config),
             "--kubeconfig", str(self.api.kubeconfig), "--root-dir", str(work / "kubelet"),
             "--cert-dir", str(work / "kubelet-pki"), "--hostname-override", NODE_NAME,
             "--node-ip", host_address(), "--v", "2"],
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
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        return conditions.get("Ready") == "True"

    # -- containerd ---------------------------------------------------------------------

    def ctr(self, *args: str, data: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
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
            with _suppress_api():
                self._delete_all_pods(timeout)
        for name in ("kube-controller-manager", "kube-scheduler", "kubelet"):
            proc = self._procs.get(name)
            if proc is not None:
                _terminate(proc, 20.0)
        if "containerd" in self._procs and self._procs["containerd"].poll() is None:
            self._remove_containers()
        proc = self._procs.get("containerd")
        if proc is not None:
            _terminate(proc, 20.0)
        self._procs.clear()
        self._kill_shims()
        self._unmount_under(self.workdir)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        _remove_cgroups("kubepods")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _delete_all_pods(self, timeout: float) -> None:
        pods = self.api.request("GET", "/api/v1/pods").body["items"]
        for pod in pods:
            meta = pod["metadata"]
            with _suppress_api():
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
                with _suppress_os():
                    os.kill(int(entry.name), signal.SIGKILL)

    @staticmethod
    def _unmount_under(folder: Path) -> None:
        prefix = str(folder)
        mounts = [
            line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
        ]
        for target in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _remove_cgroups(name: str) -> None:
    """rmdir the kubelet's ``/<name>`` cgroup tree in every v1 hierarchy, deepest first."""
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / name
        if not top.is_dir():
            continue
        folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for folder in [*folders, top]:
            with _suppress_os():
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


class _suppress_os:  # noqa: N801 - used like contextlib.suppress
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return isinstance(kind, type) and issubclass(kind, OSError)


class _suppress_api:  # noqa: N801 - used like contextlib.suppress
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return isinstance(kind, type) and issubclass(kind, (ApiError, OSError))


def run_by_hand(tools: Tools, argv: Sequence[str] = ()) -> None:  # pragma: no cover - manual
    """Start an API server and a node, print the kubeconfig, wait for ^C, stop both."""
    api = ApiServer(tools)
    node = Node(tools, api)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        api.start()
        node.start()
        print(f"KUBECONFIG={api.kubeconfig}  node ready in {node.start_seconds:.1f} s "
              f"(work {node.workdir})", flush=True)  # fmt: skip
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        api.stop()
