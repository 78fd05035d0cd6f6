"""SeaweedFS (``weed server -s3``) as the S3-compatible object store of the tests.

SeaweedFS is built from the Go module proxy: its go.mod has ``replace`` directives, so
``go install …@version`` refuses, but ``go build ./weed`` inside the downloaded module folder
works. :func:`build` does that once into
``${STREAM_TRAINER_CACHE:-~/.cache/stream-trainer}/seaweedfs/<version>/weed`` (file lock, so
parallel runs build once; the binary is written under a temporary name and renamed into
place). The Go module and build caches live under ``<cache>/go``.

:class:`SeaweedFS` runs master, volume server, filer and S3 gateway in one process on free
loopback ports, with data in a temporary folder and an S3 identity file so every request is
signed: ``admin`` may do anything (buckets are created on its first upload) and ``reader``
may only read and list. ``start()`` returns once a signed write and read round-trip.

CLI::

    python -m stream_trainer.testing.seaweedfs build     # only build into the cache
    python -m stream_trainer.testing.seaweedfs run       # foreground, Ctrl-C stops

Needs ``go`` on the first run only. No I/O at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

import obstore
from obstore.store import S3Store

from stream_trainer.laptop.embedded import (
    BrokerStartError,
    free_port,
    register_for_exit,
)
from stream_trainer.operations.processes import pdeathsig_preexec, tail_file
from stream_trainer.testing.host import ServerProcess, file_lock
from stream_trainer.testing.kafka_broker import cache_root

__all__ = [
    "SEAWEEDFS_MODULE",
    "SEAWEEDFS_VERSION",
    "S3Identity",
    "SeaweedFS",
    "SeaweedUnavailable",
    "build",
    "main",
]

SEAWEEDFS_MODULE = "github.com/seaweedfs/seaweedfs"
# A pseudo-version of the module proxy: the newest commit checked to serve conditional PUT.
SEAWEEDFS_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
REGION = "us-east-1"


class SeaweedUnavailable(BrokerStartError):
    """SeaweedFS cannot run here: Go missing, or the build failed."""


@dataclass(frozen=True)
class S3Identity:
    """An access key pair of the server's identity file; ``repr`` hides the secret."""

    name: str
    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:
        return f"S3Identity(name={self.name!r}, access_key_id={self.access_key_id!r})"

    def env(self) -> dict[str, str]:
        """The standard AWS variables naming this identity (what a pod would get)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }


def seaweedfs_home(version: str = SEAWEEDFS_VERSION) -> Path:
    """Cache folder of one version: ``weed`` (the binary), ``.lock``, ``build.log``."""
    return cache_root() / "seaweedfs" / version


def _go_env() -> dict[str, str]:
    go = cache_root() / "go"
    return {
        **os.environ,
        "GOMODCACHE": str(go / "mod"),
        "GOCACHE": str(go / "build"),
        # The module's go.mod has replace directives that -mod=readonly rejects.
        "GOFLAGS": "-mod=mod",
    }


def _run_go(args: list[str], cwd: Path | None, timeout: float, log: Path) -> str:
    """Run ``go <args>``; stdout on success, else :class:`SeaweedUnavailable`."""
    try:
        result = subprocess.run(
            args,
            cwd=cwd,
            env=_go_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SeaweedUnavailable(f"{' '.join(args[:3])} timed out after {timeout:.0f} s") from exc
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(args)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise SeaweedUnavailable(
            f"{' '.join(args[:3])} failed (exit {result.returncode}; log {log})",
            "\n".join(result.stderr.strip().splitlines()[-30:]),
        )
    return result.stdout


def build(version: str = SEAWEEDFS_VERSION, *, timeout: float = 2400.0) -> Path:
    """Return the ``weed`` binary of ``version``, building it once (about 10 min on 2 cores).

    ``go mod download`` fetches the module, ``go build ./weed`` runs in its folder; a
    concurrent caller waits on the file lock and reuses the binary. Raises
    :class:`SeaweedUnavailable` when Go is missing or a step fails.
    """
    home = seaweedfs_home(version)
    binary = home / "weed"
    if binary.is_file():
        return binary
    with file_lock(home / ".lock"):
        if binary.is_file():
            return binary
        go = shutil.which("go")
        if go is None:
            raise SeaweedUnavailable(f"go not found on PATH and {binary} is not built")
        log = home / "build.log"
        listing = _run_go(
            [go, "mod", "download", "-json", f"{SEAWEEDFS_MODULE}@{version}"], None, timeout, log
        )
        module_dir = Path(json.loads(listing)["Dir"])
        partial = home / "weed.tmp"
        _run_go(
            [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), "./weed"],
            module_dir,
            timeout,
            log,
        )
        partial.rename(binary)
    return binary


class SeaweedFS(ServerProcess):
    """One ``weed server -s3`` on ``127.0.0.1`` with signed S3 requests.

    ``endpoint_url`` is the S3 API (``http://127.0.0.1:<port>``); ``admin`` and ``reader``
    are its identities; ``bucket`` exists once ``start()`` returned (tests share it and
    keep apart by prefix: every bucket costs the server several volumes). ``stop()`` keeps
    the data folder and ports, so ``start()`` again brings the same objects back (an outage
    of the store); ``close()`` deletes them.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        bucket: str = "stream-trainer",
        startup_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        self.admin = S3Identity("admin", "admin-" + secrets.token_hex(6), secrets.token_hex(20))
        self.reader = S3Identity("reader", "reader-" + secrets.token_hex(6), secrets.token_hex(20))
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._work_dir: Path | None = None
        self.start_seconds: float | None = None

    @property
    def name(self) -> str:
        return "seaweedfs"

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self._ports:
            raise RuntimeError("SeaweedFS has not been started")
        return f"http://{self.host}:{self._ports['s3']}"

    @property
    def region(self) -> str:
        return REGION

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._work_dir / "weed.log" if self._work_dir is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)

    def _identity_file(self, work: Path) -> Path:
        def identity(who: S3Identity, actions: list[str]) -> dict[str, object]:
            return {
                "name": who.name,
                "credentials": [
                    {"accessKey": who.access_key_id, "secretKey": who.secret_access_key}
                ],
                "actions": actions,
            }

        config = {
            "identities": [
                identity(self.admin, ["Admin", "Read", "List", "Tagging", "Write"]),
                identity(self.reader, ["Read", "List"]),
            ]
        }
        path = work / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def _command(self, binary: Path, work: Path) -> list[str]:
        p = self._ports
        return [
            str(binary),
            f"-logdir={work}",  # glog files, else they pile up in /tmp
            "server",
            f"-dir={work / 'data'}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # Small volumes, many allowed: each bucket is a collection that grows several
            # volumes at its first write, and a full server answers 500 to every PUT.
            "-master.volumeSizeLimitMB=16",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=200",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={work / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={work / 's3.sock'}",
            f"-s3.config={self._identity_file(work)}",
        ]

    def start(self) -> Self:
        """Start (building first if needed) and wait until a signed round trip works."""
        if self.is_running():
            return self
        began = time.monotonic()
        binary = build()
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="stream-trainer-seaweedfs-"))
            (self._work_dir / "data").mkdir()
        if not self._ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
            self._ports = {name: free_port(self.host) for name in (*names, "s3", "s3_grpc")}
        assert self.log_path is not None
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self._command(binary, self._work_dir),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509
            cwd=self._work_dir,
        )
        register_for_exit(self)
        try:
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Poll until the S3 port answers, then until a signed put + get round-trips (the
        gateway answers before the filer and a writable volume are ready)."""
        pause = threading.Event()
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BrokerStartError(
                    f"SeaweedFS exited during start-up (code {code})", self.log_tail()
                )
            try:
                self._probe()
                return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except Exception as exc:  # any failure means: not ready yet
                last = f"{type(exc).__name__}: {exc}"
            pause.wait(0.2)
        raise BrokerStartError(
            f"SeaweedFS S3 did not answer on {self.endpoint_url} within "
            f"{self.startup_timeout:.0f} s (last: {last})",
            self.log_tail(),
        )

    def _probe(self) -> None:
        # Unsigned first: cheap, and tells "port closed" apart from "not ready".
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2.0):  # noqa: S310
                pass
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise
        store = self.store(self.bucket)
        obstore.put(store, "probe", b"ok")
        if bytes(obstore.get(store, "probe").bytes()) != b"ok":
            raise RuntimeError("probe object did not read back")

    def store(self, bucket: str, *, identity: S3Identity | None = None) -> S3Store:
        """An ``obstore`` S3Store on ``bucket`` signed as ``identity`` (default admin).
        The admin's first upload creates the bucket."""
        who = identity or self.admin
        return S3Store(
            bucket,
            endpoint=self.endpoint_url,
            region=REGION,
            access_key_id=who.access_key_id,
            secret_access_key=who.secret_access_key,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    def create_bucket(self, bucket: str) -> None:
        """Make ``bucket`` exist (the admin's upload of a marker creates it)."""
        store = self.store(bucket)
        obstore.put(store, ".bucket-created", b"")
        obstore.delete(store, ".bucket-created")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stream_trainer.testing.seaweedfs``."""
    parser = argparse.ArgumentParser(
        prog="python -m stream_trainer.testing.seaweedfs",
        description=f"SeaweedFS {SEAWEEDFS_VERSION} (weed server -s3) from the Go module proxy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="only build into the cache (prints the binary and seconds)")
    sub.add_parser("run", help="run in the foreground until Ctrl-C / SIGTERM")
    args = parser.parse_args(argv)
    began = time.monotonic()
    try:
        if args.command == "build":
            print(f"{build()} ({time.monotonic() - began:.1f} s)")
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with SeaweedFS() as server:
            print(server.endpoint_url)
            # Printed on purpose: a manual run needs the keys to talk to the server.
            for who in (server.admin, server.reader):
                print(f"{who.name}: {who.access_key_id} {who.secret_access_key}", file=sys.stderr)
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
    except BrokerStartError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
