"""CheckpointStore, DirectoryLock and BackgroundWriter on the real filesystem."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shlex
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.publishing.signing import sign
from stream_trainer.state import checkpoint as ck
from stream_trainer.state.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    CheckpointLocked,
    CheckpointManifest,
    CheckpointStore,
    DirectoryLock,
    WriteResult,
)

KEY = b"test-key-0123456789abcdef"
OTHER_KEY = b"another-key-fedcba9876543210"


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def fields(n: int = 0, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "offsets": {"in:0": 100 + n, "in:1": 7},
        "model_version": n or None,
        "config_hash": "c" * 64,
        "records_learnt": 1000 + n,
        "metrics": {"accuracy": 0.9, "r2": float("nan")},
        "extra": {"mode": "per_record"},
    }
    base.update(overrides)
    return base


def store(directory: Path, key: bytes | None = KEY, **kwargs: Any) -> CheckpointStore:
    kwargs.setdefault("allow_unsigned", False)
    kwargs.setdefault("keep_last", 5)
    return CheckpointStore(directory, key, **kwargs)


def write_state(s: CheckpointStore, state: Any, n: int = 0, **overrides: Any) -> WriteResult[Path]:
    return s.write(s.serialize(state), fields(n, **overrides))


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """The stored manifest (with hmac) and payload, parsed by hand from the documented format."""
    data = path.read_bytes()
    assert data[:8] == b"STCKPT1\n"
    (length,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12 : 12 + length]), data[12 + length :]


def assemble(manifest: dict[str, Any], payload: bytes) -> bytes:
    raw = json.dumps(manifest).encode()
    return b"STCKPT1\n" + struct.pack(">I", len(raw)) + raw + payload


def quarantined(directory: Path) -> dict[str, str]:
    """name -> reason text of every quarantined checkpoint."""
    q = directory / "quarantine"
    if not q.is_dir():
        return {}
    return {
        p.name: p.with_name(p.name + ".reason").read_text()
        for p in q.iterdir()
        if not p.name.endswith(".reason")
    }


def test_round_trip_manifest_is_plain_json_and_key_never_written(tmp_path: Path) -> None:
    s = store(tmp_path)
    state = {"model": list(range(1000)), "evaluator": {"n": 3}}
    result = write_state(s, state, 1)
    print(f"\nwrote {result.size_bytes} bytes in {result.duration_s * 1000:.2f} ms")

    loaded = store(tmp_path).load_latest()
    assert loaded is not None
    assert loaded.state == state
    assert loaded.path == result.path == tmp_path / "ckpt-000000000001.ckpt"
    m = loaded.manifest
    assert (m.sequence, m.offsets, m.model_version, m.records_learnt) == (
        1,
        {"in:0": 101, "in:1": 7},
        1,
        1001,
    )
    assert m.metrics == {"accuracy": 0.9, "r2": None}  # NaN is not JSON: stored as null
    assert m.signed and m.serializer == "pickle5"
    assert set(m.library_versions) >= {"python", "river", "sklearn", "numpy", "stream_trainer"}
    raw_manifest, payload = split(result.path)
    assert raw_manifest["payload_size"] == len(payload) == m.payload_size
    assert len(raw_manifest["hmac"]) == 64
    assert KEY not in result.path.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
    assert os.stat(result.path).st_mode & 0o777 == 0o600


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    s = store(tmp_path, keep_last=2)
    for n in range(5):
        write_state(s, {"n": n}, n)
    assert [p.name for p in s.list()] == ["ckpt-000000000004.ckpt", "ckpt-000000000005.ckpt"]
    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 4}


def test_sequence_survives_new_store_and_quarantine(tmp_path: Path) -> None:
    write_state(store(tmp_path), {"n": 1})
    write_state(store(tmp_path), {"n": 2})
    assert write_state(store(tmp_path), {"n": 3}).sequence == 3
    # Quarantine the newest: its sequence is still never reused.
    (tmp_path / "ckpt-000000000003.ckpt").write_bytes(b"garbage")
    assert store(tmp_path).load_latest() is not None
    assert write_state(store(tmp_path), {"n": 4}).sequence == 4


def test_corrupt_payload_byte_is_quarantined_and_previous_used(tmp_path: Path) -> None:
    seen: list[tuple[Path, str]] = []
    s = store(tmp_path, on_quarantine=lambda p, r: seen.append((p, r)))
    write_state(s, {"n": 1})
    bad = write_state(s, {"n": 2}).path
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))

    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    assert not bad.exists()
    assert seen == [(tmp_path / "quarantine" / f"{bad.name}.payload_checksum", "payload_checksum")]
    assert "sha256" in quarantined(tmp_path)[f"{bad.name}.payload_checksum"]


@pytest.mark.parametrize("keep", [3, 10, 200, -5])
def test_truncated_file_is_quarantined(tmp_path: Path, keep: int) -> None:
    s = store(tmp_path)
    write_state(s, {"n": 1})
    bad = write_state(s, {"n": 2, "blob": b"x" * 1000}).path
    bad.write_bytes(bad.read_bytes()[:keep])

    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    assert list(quarantined(tmp_path)) == [f"{bad.name}.truncated"]


def test_pickle_runs_code_so_the_tamper_tests_mean_something(tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4()}"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


@pytest.mark.parametrize("forgery", ["stale_hmac", "forged_hmac", "no_hmac_claims_signed"])
def test_tampered_malicious_payload_is_never_unpickled(tmp_path: Path, forgery: str) -> None:
    marker = Path("/tmp") / f"pwned-{uuid.uuid4()}"
    s = store(tmp_path, allow_unsigned=(forgery == "no_hmac_claims_signed"))
    write_state(s, {"n": 1})
    target = write_state(s, {"n": 2}).path
    manifest, _ = split(target)
    evil = pickle.dumps(Evil(marker), protocol=5)
    # The attacker fixes the checksum so only the signature can catch it.
    manifest["payload_sha256"] = hashlib.sha256(evil).hexdigest()
    manifest["payload_size"] = len(evil)
    if forgery == "forged_hmac":
        unsigned = {k: v for k, v in manifest.items() if k != "hmac"}
        canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
        manifest["hmac"] = sign(b"guessed-key", canonical)
    elif forgery == "no_hmac_claims_signed":
        manifest["hmac"] = None
    target.write_bytes(assemble(manifest, evil))

    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    reason = "bad_manifest" if forgery == "no_hmac_claims_signed" else "bad_signature"
    assert list(quarantined(tmp_path)) == [f"{target.name}.{reason}"]
    assert not marker.exists()


def test_unsigned_malicious_file_dropped_in_signed_dir_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4()}"
    attacker = store(tmp_path, key=None, allow_unsigned=True)
    write_state(attacker, Evil(marker))

    with pytest.raises(CheckpointError, match=r"unsigned.*allow_unsigned"):
        store(tmp_path).load_latest()
    assert not marker.exists()
    assert len(store(tmp_path).list()) == 1  # refused, not quarantined: config, not data


def test_signed_checkpoint_without_key_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4()}"
    write_state(store(tmp_path), Evil(marker))  # genuinely signed
    with pytest.raises(CheckpointError, match="signed but no HMAC key"):
        store(tmp_path, key=None, allow_unsigned=True).load_latest()
    assert not marker.exists()


def test_no_key_without_allow_unsigned_is_rejected_at_construction(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="allow_unsigned"):
        CheckpointStore(tmp_path, None, allow_unsigned=False, keep_last=3)


def test_unsigned_mode_round_trip(tmp_path: Path) -> None:
    s = store(tmp_path, key=None, allow_unsigned=True)
    write_state(s, {"n": 1})
    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 1} and not loaded.manifest.signed
    assert split(loaded.path)[0]["hmac"] is None


def test_wrong_key_is_quarantined_as_bad_signature(tmp_path: Path) -> None:
    write_state(store(tmp_path, key=OTHER_KEY), {"n": 1})
    seen: list[str] = []
    assert store(tmp_path, on_quarantine=lambda p, r: seen.append(r)).load_latest() is None
    assert seen == ["bad_signature"]


def test_library_mismatch_is_quarantined(tmp_path: Path) -> None:
    s = store(tmp_path)
    write_state(s, {"n": 1})
    old = {**ck.library_versions(), "river": "0.1.0"}
    bad = write_state(s, {"n": 2}, library_versions=old).path
    # A patch-level difference is fine.
    major, minor, *_ = ck.library_versions()["numpy"].split(".")
    ok = write_state(
        s, {"n": 3}, library_versions={**ck.library_versions(), "numpy": f"{major}.{minor}.999"}
    )

    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 3}
    ok.path.unlink()
    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    text = quarantined(tmp_path)[f"{bad.name}.library_mismatch"]
    assert "river 0.1.0" in text


def test_validate_failure_is_quarantined_and_previous_tried(tmp_path: Path) -> None:
    s = store(tmp_path)
    write_state(s, {"weights": [1.0, 2.0]})
    bad = write_state(s, {"weights": [1.0, float("nan")]}).path
    calls: list[int] = []

    def validate(state: Any, manifest: CheckpointManifest) -> None:
        calls.append(manifest.sequence)
        if not all(math.isfinite(w) for w in state["weights"]):
            raise ValueError("non-finite weight")

    loaded = s.load_latest(validate)
    assert loaded is not None and loaded.manifest.sequence == 1
    assert calls == [2, 1]
    assert "non-finite weight" in quarantined(tmp_path)[f"{bad.name}.validation_failed"]


def test_unpicklable_payload_is_quarantined(tmp_path: Path) -> None:
    s = store(tmp_path)
    write_state(s, {"n": 1})
    s.write(b"\x80\x05not a pickle", fields())
    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    assert list(quarantined(tmp_path)) == ["ckpt-000000000002.ckpt.unpickle_failed"]


def test_renamed_old_checkpoint_is_quarantined_as_sequence_mismatch(tmp_path: Path) -> None:
    s = store(tmp_path)
    first = write_state(s, {"n": 1}).path
    write_state(s, {"n": 2})
    replay = tmp_path / "ckpt-000000000009.ckpt"
    replay.write_bytes(first.read_bytes())
    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 2}
    assert list(quarantined(tmp_path)) == [f"{replay.name}.sequence_mismatch"]


def test_disk_full_via_os_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store(tmp_path)
    write_state(s, {"n": 1})
    real_write = os.write
    budget = [4096]

    def full_disk(fd: int, data: Any) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left.*untouched"):
        s.write(s.serialize({"blob": b"y" * 100_000}), fields())
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000000001.ckpt"]
    loaded = store(tmp_path).load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    # The store keeps working once space is back.
    assert write_state(s, {"n": 3}).sequence == 2


def test_disk_full_via_rlimit_fsize_in_subprocess(tmp_path: Path) -> None:
    write_state(store(tmp_path), {"n": 1})
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from stream_trainer.state.checkpoint import CheckpointStore, CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        s = CheckpointStore(Path({str(tmp_path)!r}), {KEY!r}, False, 5)
        try:
            s.write(s.serialize(b"z" * 1_000_000), {fields(metrics={})!r})
        except CheckpointError as e:
            print("ERR", e)
            sys.exit(0)
        sys.exit("write succeeded despite RLIMIT_FSIZE")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    print(f"\n{proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "File too large" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000000001.ckpt"]
    loaded = store(tmp_path).load_latest()
    assert loaded is not None and loaded.state == {"n": 1}


def test_temp_files_are_ignored_and_cleaned_by_load(tmp_path: Path) -> None:
    s = store(tmp_path)
    write_state(s, {"n": 1})
    leftover = tmp_path / ".ckpt-000000000002.ckpt.123.abcd.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert [p.name for p in s.list()] == ["ckpt-000000000001.ckpt"]
    assert s.latest_manifest() is not None
    assert leftover.exists()  # read-only operations leave it alone
    loaded = s.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    assert not leftover.exists()


def test_inspect_and_latest_manifest_never_unpickle(tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4()}"
    s = store(tmp_path)
    good = write_state(s, {"n": 1}).path
    evil = write_state(s, Evil(marker)).path  # validly signed, still never unpickled here

    report = s.inspect(evil)
    assert report["verification"] == "ok"
    assert report["manifest"]["sequence"] == 2 and "hmac" not in report["manifest"]
    manifest = s.latest_manifest()
    assert manifest is not None and manifest.sequence == 2
    assert store(tmp_path, key=OTHER_KEY).inspect(evil)["verification"] == "bad_signature"
    assert (
        store(tmp_path, key=None, allow_unsigned=True).inspect(evil)["verification"]
        == "signed_but_no_key"
    )
    data = bytearray(evil.read_bytes())
    data[-2] ^= 1
    evil.write_bytes(bytes(data))
    assert s.inspect(evil)["verification"] == "payload_checksum"
    latest = s.latest_manifest()
    assert latest is not None and latest.sequence == 1
    assert s.inspect(good)["verification"] == "ok"
    assert evil.exists()  # inspect and latest_manifest quarantine nothing
    assert not marker.exists()


def test_directory_lock_second_process_fails_fast_naming_pid(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from stream_trainer.state.checkpoint import DirectoryLock, CheckpointLocked
        t = time.monotonic()
        try:
            DirectoryLock(Path({str(tmp_path)!r})).acquire()
        except CheckpointLocked as e:
            print(f"{{time.monotonic() - t:.4f}}", e)
            sys.exit(3)
        print("acquired")
        """
    )
    with DirectoryLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(CheckpointLocked, match=f"locked by pid {os.getpid()}"):
            DirectoryLock(tmp_path).acquire()
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
        )
        elapsed, _, message = proc.stdout.strip().partition(" ")
        print(f"\nsecond process refused after {float(elapsed) * 1000:.2f} ms: {message}")
        assert proc.returncode == 3, proc.stderr
        assert float(elapsed) < 1.0
        assert message == (
            f"checkpoint directory {tmp_path} is locked by pid {os.getpid()}; "
            "another stream-trainer is running on it"
        )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "acquired", proc.stderr


def test_directory_lock_released_when_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from stream_trainer.state.checkpoint import "
            f"DirectoryLock; DirectoryLock(Path({str(tmp_path)!r})).acquire(); "
            "print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointLocked, match=f"pid {holder.pid}"):
            DirectoryLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=10)
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.stdout.close()
    with DirectoryLock(tmp_path) as lock:
        assert lock.held


def test_background_writer_writes_and_future_resolves(tmp_path: Path) -> None:
    s = store(tmp_path)
    writer = BackgroundWriter(s)
    future = writer.submit(s.serialize({"n": 1}), fields())
    assert future is not None
    result = future.result(timeout=30)
    assert result.sequence == 1 and result.path.exists()
    assert writer.close(timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(b"", fields())


class _BlockingStore:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def write(self, payload: bytes, manifest_fields: dict[str, Any]) -> WriteResult[Path]:
        self.calls += 1
        self.started.set()
        assert self.release.wait(timeout=30)
        if payload == b"fail":
            raise CheckpointError("disk full")
        return WriteResult(Path("x"), len(payload), 0.0, self.calls)


def test_background_writer_skips_while_busy_and_reports_errors() -> None:
    fake = _BlockingStore()
    writer = BackgroundWriter(fake)
    first = writer.submit(b"a", {})
    assert first is not None and fake.started.wait(timeout=30)
    assert writer.busy
    assert writer.submit(b"b", {}) is None  # one write in flight: the caller skips
    t = time.monotonic()
    assert not writer.close(timeout=0.05)  # still running
    assert time.monotonic() - t < 5
    fake.release.set()
    assert first.result(timeout=30).sequence == 1
    assert writer.close(timeout=30)
    assert fake.calls == 1

    writer = BackgroundWriter(fake)
    failing = writer.submit(b"fail", {})
    assert failing is not None
    with pytest.raises(CheckpointError, match="disk full"):
        failing.result(timeout=30)
    assert not writer.busy
    writer.close(timeout=30)


def test_numpy_and_non_finite_metrics_are_stored_as_json(tmp_path: Path) -> None:
    import numpy as np

    s = store(tmp_path)
    metrics = {"acc": np.float32(0.5), "n": np.int64(3), "bad": [np.float64("inf"), 1.0]}
    write_state(s, {"n": 1}, metrics=metrics)
    manifest = s.latest_manifest()
    assert manifest is not None
    assert manifest.metrics == {"acc": 0.5, "n": 3, "bad": [None, 1.0]}


def test_write_rejects_unknown_or_missing_fields(tmp_path: Path) -> None:
    s = store(tmp_path)
    with pytest.raises(ValueError, match=r"unknown.*'bogus'"):
        s.write(b"x", {**fields(), "bogus": 1})
    with pytest.raises(ValueError, match=r"missing.*'offsets'"):
        s.write(b"x", {k: v for k, v in fields().items() if k != "offsets"})
    assert s.list() == []
