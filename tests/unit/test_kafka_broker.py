"""The test Kafka broker's helpers that need no JVM."""

from __future__ import annotations

import base64
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from stream_trainer.testing import kafka_broker


def test_cluster_ids_never_look_like_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first draws encode to ids starting with "-" (kafka-storage took them for options).
    leading_dash = bytes([0xF8]) + bytes(15)
    draws = iter([leading_dash, leading_dash, bytes(range(16))])

    class FakeUuid:
        def __init__(self) -> None:
            self.bytes = next(draws)

    monkeypatch.setattr(uuid, "uuid4", FakeUuid)
    assert base64.urlsafe_b64encode(leading_dash).decode().startswith("-")
    cluster_id = kafka_broker._cluster_id()
    assert not cluster_id.startswith("-")
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_make_kafka_start_uses_a_fixed_port() -> None:
    root = Path(__file__).resolve().parents[2]
    for extra, port in (([], "9092"), (["KAFKA_PORT=19092"], "19092")):
        dry_run = subprocess.run(
            ["make", "-n", "-C", str(root), "kafka-start", *extra],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert f"kafka_broker start --port {port}\n" in dry_run.stdout


def test_start_on_a_busy_port_fails_at_once_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAM_TRAINER_CACHE", str(tmp_path))  # no broker of ours running
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        code = kafka_broker.main(["start", "--port", str(port)])
        elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    print(f"busy port {port}: exit {code} after {elapsed:.2f} s: {err}")
    assert code == 1
    assert err.count("\n") == 1 and f"port {port}" in err and "KAFKA_PORT" in err
    assert elapsed < 5  # no JVM was started
