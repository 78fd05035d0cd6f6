"""A private Docker daemon and the project image, for the container tests and by hand.

No registry is reachable from CI, so the default ``PYTHON_IMAGE`` cannot be pulled. This
module makes everything locally from Debian packages and caches it under
``${STREAM_TRAINER_CACHE:-~/.cache/stream-trainer}/docker``:

1. ``dockerd`` (Debian ``docker.io``) with its own data root, exec root, unix socket and
   pid file there, bridge and iptables off (builds and containers use the host network),
   so it never meets a system daemon and leaves no rules behind. Stopped by pid.
2. A Debian bookworm base: ``debootstrap --variant=minbase bookworm`` from the mirror apt
   uses, ``docker import``-ed.
3. A Python base on it from Debian packages (python3.11, python3-venv, ca-certificates)
   with the host's CA bundle copied in and pip pointed at it, so pip inside the build
   trusts an intercepting proxy whose CA only the host's store holds.
4. The project image, built unchanged with ``--build-arg PYTHON_IMAGE=<that base>`` by the
   legacy builder (no BuildKit here).

Bases are tagged with a hash of their recipe and reused while it matches; the project
image build relies on Docker's layer cache. Command line::

    python -m tests.container.docker_env build     # start, build everything, stop
    python -m tests.container.docker_env start     # leave a daemon running (prints DOCKER_HOST)
    python -m tests.container.docker_env stop
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
DEBIAN_REPO = "stream-trainer-base/debian"
PYTHON_REPO = "stream-trainer-base/python"
PROJECT_IMAGE = "stream-trainer:test"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# The Python base: what python:3.11-slim-bookworm gives the Dockerfile (`python` on PATH,
# venv, CA certificates). The host's bundle replaces Debian's, and pip.conf points pip at
# it (pip's own certifi copy would not know a proxy's CA).
PYTHON_BASE_DOCKERFILE = """\
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3.11 python3-venv ca-certificates \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \\
 && ln -s /usr/bin/python3.11 /usr/local/bin/python
COPY host-ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
CMD ["python3"]
"""
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"


class DockerEnvError(Exception):
    """The daemon or an image could not be made; the message says which step and why."""


def cache_dir() -> Path:
    """``$STREAM_TRAINER_CACHE/docker`` (default ``~/.cache/stream-trainer/docker``)."""
    env = os.environ.get("STREAM_TRAINER_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "stream-trainer"
    return base / "docker"


def apt_mirror() -> str:
    """The Debian mirror apt uses for bookworm (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    for path in sources:
        text = path.read_text(errors="replace")
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, flags=re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, flags=re.MULTILINE)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if match:
                    return match.group(1)
    return DEFAULT_MIRROR


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:12]


@dataclass
class Timings:
    """Seconds per step of one :meth:`DockerEnv.ensure_image` (0 when cached)."""

    daemon: float = 0.0
    debian_base: float = 0.0
    python_base: float = 0.0
    image: float = 0.0
    cached: list[str] = field(default_factory=list)

    def summary(self) -> str:
        cached = f" (cached: {', '.join(self.cached)})" if self.cached else ""
        return (
            f"dockerd {self.daemon:.1f} s, debian base {self.debian_base:.1f} s, "
            f"python base {self.python_base:.1f} s, image {self.image:.1f} s{cached}"
        )


class DockerEnv:
    """One private ``dockerd``; ``start()`` / ``stop()`` (by pid), ``docker(...)`` runs the
    client against it. Holds an exclusive lock on the cache folder while running, so two
    sessions never share a data root."""

    def __init__(self, root: Path | None = None, log: IO[str] | None = None) -> None:
        self.root = root or cache_dir()
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "dockerd.pid"
        self.log_path = self.root / "dockerd.log"
        self.host = f"unix://{self.socket}"
        self.timings = Timings()
        self._log = log or sys.stderr
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        dockerd = shutil.which("dockerd")
        # The client shipped with the daemon (Debian's); a newer client elsewhere on PATH
        # also works (API negotiation), but one version pair is what CI tests.
        client = Path(dockerd).with_name("docker") if dockerd else None
        self.dockerd = dockerd
        self.client = str(client) if client and client.is_file() else shutil.which("docker")

    # -- daemon -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemon and wait until it answers; DockerEnvError with its log tail."""
        if self.dockerd is None or self.client is None:
            raise DockerEnvError(
                "dockerd not found: install Debian's docker.io (.ci/run does under CI)"
            )
        if os.geteuid() != 0:
            raise DockerEnvError("dockerd needs root (rootless Docker is not set up here)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = (self.root / "lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise DockerEnvError(f"{self.root} is in use by another session") from None
        self._stop_leftover()
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    self.dockerd,
                    f"--data-root={self.data_root}",
                    f"--exec-root={self.exec_root}",
                    f"--host={self.host}",
                    f"--pidfile={self.pidfile}",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-masq=false",
                    "--storage-driver=overlay2",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                self._proc = None
                self.release()
                raise DockerEnvError(f"dockerd exited at start:\n{tail}")
            probe = self.docker("version", "--format", "{{.Server.Version}}", check=False)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise DockerEnvError(f"dockerd did not answer in {timeout:.0f} s")
            time.sleep(0.2)  # polling interval of a bounded wait
        self.timings.daemon = time.monotonic() - began
        # Images no build has used for a week (superseded layers) would grow the cache.
        self.docker("image", "prune", "--force", "--filter", "until=168h", check=False)

    def _stop_leftover(self) -> None:
        """A daemon a crashed session left on this data root: stop it by its pid file."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"dockerd" in cmdline and str(self.data_root).encode() in cmdline:
            print(f"stopping leftover dockerd {pid}", file=self._log)
            _terminate(pid, 30.0)
            self._unmount_leftovers()

    def stop(self, timeout: float = 30.0) -> None:
        """Remove containers, then SIGTERM the daemon (SIGKILL after ``timeout``)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False)
                _terminate(self._proc.pid, timeout)
                self._proc.wait(timeout=5)
            self._proc = None
            self._unmount_leftovers()
        self.release()

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its default network namespace mounted under the exec root:
        unmount whatever is still mounted below our folders (deepest first)."""
        prefix = f"{self.root}/"
        try:
            lines = Path("/proc/self/mounts").read_text().splitlines()
        except OSError:
            return
        points = [line.split()[1] for line in lines if len(line.split()) > 1]
        for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
            subprocess.run(["umount", point], capture_output=True, check=False, timeout=30)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- client -------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for the docker client: this daemon, legacy builder."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def docker(
        self,
        *args: str,
        check: bool = True,
        input_file: IO[bytes] | None = None,
        timeout: float = 600.0,
        capture: bool = True,
        env_extra: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the client; with ``check``, DockerEnvError carries its output tail.
        ``env_extra`` reaches the client only (e.g. values for ``docker run -e NAME``)."""
        assert self.client is not None
        completed = subprocess.run(
            [self.client, *args],
            env={**self.env, **(env_extra or {})},
            stdin=input_file,
            stdout=subprocess.PIPE if capture else self._log,
            stderr=subprocess.STDOUT if not capture else subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            out = (completed.stdout or "") + (completed.stderr or "")
            tail = "\n".join(out.splitlines()[-30:])
            raise DockerEnvError(f"docker {' '.join(args[:3])} failed:\n{tail}")
        return completed

    def _cached(self, what: str) -> None:
        if what not in self.timings.cached:
            self.timings.cached.append(what)

    def image_exists(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    # -- images -------------------------------------------------------------------------

    def debian_base(self) -> str:
        """The minbase bookworm image (debootstrap + import), made once per mirror."""
        mirror = apt_mirror()
        ref = f"{DEBIAN_REPO}:{SUITE}-minbase-{_hash(mirror.encode(), DPKG_EXCLUDES.encode())}"
        if self.image_exists(ref):
            self._cached("debian base")
            return ref
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise DockerEnvError("debootstrap not found: install Debian's debootstrap")
        began = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.root, prefix="rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            print(f"debootstrap --variant=minbase {SUITE} from {mirror}", file=self._log)
            completed = subprocess.run(
                [debootstrap, "--variant=minbase", SUITE, str(rootfs), mirror],
                capture_output=True,
                text=True,
                check=False,
                timeout=1800,
            )
            if completed.returncode != 0:
                tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-30:])
                raise DockerEnvError(f"debootstrap failed:\n{tail}")
            _slim(rootfs)
            tar = subprocess.Popen(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                stdout=subprocess.PIPE,
            )
            assert tar.stdout is not None
            try:
                self.docker("import", "-", ref, input_file=tar.stdout, timeout=900)
            finally:
                tar.stdout.close()
                tar.wait()
        self.timings.debian_base = time.monotonic() - began
        return ref

    def python_base(self) -> str:
        """Python 3.11 from Debian on the minbase image, trusting the host's CAs."""
        debian = self.debian_base()
        bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
        recipe = PYTHON_BASE_DOCKERFILE.encode() + PIP_CONF.encode()
        ref = f"{PYTHON_REPO}:3.11-{SUITE}-{_hash(debian.encode(), recipe, bundle)}"
        if self.image_exists(ref):
            self._cached("python base")
            return ref
        began = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.root, prefix="pybase-") as tmp:
            context = Path(tmp)
            (context / "Dockerfile").write_text(PYTHON_BASE_DOCKERFILE)
            (context / "pip.conf").write_text(PIP_CONF)
            if bundle:
                (context / "host-ca-certificates.crt").write_bytes(bundle)
            else:
                # No host bundle: keep Debian's own (a copy of it from the base).
                raise DockerEnvError(f"{HOST_CA_BUNDLE} missing: cannot build a trusting base")
            self.docker(
                "build",
                "--network=host",
                "--build-arg",
                f"DEBIAN_IMAGE={debian}",
                "-t",
                ref,
                str(context),
                capture=False,
                timeout=1800,
            )
        self.timings.python_base = time.monotonic() - began
        return ref

    def project_image(
        self, tag: str = PROJECT_IMAGE, target: str | None = None, context: Path = ROOT
    ) -> str:
        """The Dockerfile built unchanged on the local Python base (layer cache reused)."""
        base = self.python_base()
        began = time.monotonic()
        args = ["build", "--network=host", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag]
        if target is not None:
            args += ["--target", target]
        self.docker(*args, str(context), capture=False, timeout=1800)
        self.timings.image += time.monotonic() - began
        return tag


# As Debian's slim images do: no documentation, manual pages or translations, now or in
# packages installed later (dpkg's path-exclude); copyright files stay.
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


def _slim(rootfs: Path) -> None:
    """Drop apt's caches, docs, manuals and translations from a debootstrapped tree."""
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (rootfs / folder).glob("*"):
            if item.is_file():
                item.unlink()
    for folder in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        for item in (rootfs / folder).glob("*"):
            if item.name == "locale.alias":
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    for item in (rootfs / "usr/share/doc").glob("*/*"):
        if item.name == "copyright":
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
    (rootfs / "etc/dpkg/dpkg.cfg.d/excludes").write_text(DPKG_EXCLUDES)


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM ``pid``, SIGKILL it after ``timeout`` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # Our own child stays a zombie until reaped: waitpid tells that it exited.
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.2)  # polling interval of a bounded wait
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def running(log: IO[str] | None = None) -> Iterator[DockerEnv]:
    """A started :class:`DockerEnv`, stopped on exit whatever happens."""
    env = DockerEnv(log=log)
    env.start()
    try:
        yield env
    finally:
        env.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.container.docker_env")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="start a daemon, build bases + image, stop")
    build.add_argument("--target", default=None, help="Dockerfile stage (default: last)")
    build.add_argument("--tag", default=PROJECT_IMAGE)
    sub.add_parser("start", help="start a daemon and leave it running")
    sub.add_parser("stop", help="stop the daemon a `start` left running")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            with running() as env:
                env.project_image(args.tag, args.target)
                print(env.timings.summary())
                print(env.docker("image", "ls").stdout)
        elif args.command == "start":
            env = DockerEnv()
            env.start()
            env.release()  # the lock dies with this process; `stop` finds the pid file
            print(f"export DOCKER_HOST={env.host}")
        else:
            env = DockerEnv()
            env._stop_leftover()
    except DockerEnvError as error:
        print(f"docker_env: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
