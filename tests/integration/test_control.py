"""`stream-trainer control` against real brokers: queued commands, acks, --wait, once only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import produce
from stream_trainer.operations.control import Command, encode_command
from tests.conftest import BrokerHandle
from tests.harness import HMAC_KEY, ServiceProcess, read_topic, service_config, wait_for

pytestmark = pytest.mark.integration

LEARNT = "stream_trainer_records_learnt_total"
PAUSED = 'stream_trainer_state{stream_trainer_state="paused"}'
EXIT_REFUSED, EXIT_NO_ANSWER = 3, 4


def control(service: ServiceProcess, *words: str) -> subprocess.CompletedProcess[str]:
    """``stream-trainer control WORDS`` with the service's config, bounded to 90 s."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_trainer",
            "control",
            *words,
            "--config",
            str(service.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY},
    )


def command_id(output: str) -> str:
    found = re.search(r"\(id ([0-9a-f]{32})\)", output)
    assert found, output
    return found.group(1)


def acks(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ack on the control topic, in order."""
    records = read_topic(config["kafka"]["bootstrap_servers"], config["topics"]["control"])
    bodies = [json.loads(m.value()) for m in records]
    return [b for b in bodies if b.get("type") == "ack"]


def ack_of(config: dict[str, Any], command: str) -> dict[str, Any]:
    """The ack of command id ``command`` (waits for it)."""
    ack: dict[str, Any] = wait_for(
        lambda: next((a for a in acks(config) if a["id"] == command), None),
        60,
        f"the ack of {command}",
    )
    return ack


def produce_rows(config: dict[str, Any], count: int, seed: int) -> None:
    produce(
        {"bootstrap.servers": config["kafka"]["bootstrap_servers"]},
        config["topics"]["input"][0],
        get_dataset("phishing"),
        count,
        seed=seed,
    )


def test_queued_commands_act_once_across_restarts(broker: BrokerHandle, tmp_path: Path) -> None:
    config = service_config(tmp_path, broker.bootstrap_servers)
    service = ServiceProcess(config, tmp_path)

    # No service: --wait gives up after its timeout, non-zero, saying the command stays queued.
    began = time.monotonic()
    waited = control(service, "pause", "--wait", "3")
    assert waited.returncode == EXIT_NO_ANSWER, waited.stderr
    assert time.monotonic() - began >= 3
    assert "no answer to pause" in waited.stderr and "stays queued" in waited.stderr
    pause = command_id(waited.stderr)
    produce_rows(config, 200, seed=1)

    with service:
        # Acted on at start: the service comes up paused and learns nothing.
        assert ack_of(config, pause)["outcome"] == "done"
        service.wait_metric(PAUSED, 1, timeout=60)
        assert service.metric(LEARNT) == 0
        resumed = control(service, "resume", "--wait", "60")
        assert resumed.returncode == 0, resumed.stderr
        assert re.match(r"resume done \(id \w+\): resumed", resumed.stdout)
        resume = command_id(resumed.stdout)
        service.wait_metric(LEARNT, 200, timeout=60)
        assert service.stop() == 0

    # Restarted: pause and resume are not applied again (the service does not come up
    # paused), and nothing before the next command is answered again.
    produce_rows(config, 100, seed=2)
    with ServiceProcess(config, tmp_path, name="second") as second:
        second.wait_metric(LEARNT, 100, timeout=60)  # this process's count
        published = control(second, "publish", "--wait", "60")
        assert published.returncode == 0, published.stderr
        assert published.stdout.endswith("): published version 1\n")
        assert second.metric(PAUSED) == 0
        publish = command_id(published.stdout)
        assert [a["id"] for a in acks(config)] == [pause, resume, publish]
        assert second.stop() == 0


def test_wait_reports_done_and_refused_with_reason(broker: BrokerHandle, tmp_path: Path) -> None:
    config = service_config(tmp_path, broker.bootstrap_servers)  # per_record
    produce_rows(config, 100, seed=1)
    with ServiceProcess(config, tmp_path) as service:
        service.wait_metric(LEARNT, 100, timeout=60)
        published = control(service, "publish", "--wait")
        assert published.returncode == 0, published.stderr
        assert published.stdout.startswith("publish done (id ")
        assert published.stdout.endswith("): published version 1\n")

        refused = control(service, "retrain", "--wait", "60")
        assert refused.returncode == EXIT_REFUSED, (refused.stdout, refused.stderr)
        assert (
            "): retrain needs training.mode full_batch; this model runs per_record"
            in refused.stderr
        )

        queued = control(service, "publish")  # no --wait: says queued, not "sent"
        assert queued.returncode == 0, queued.stderr
        assert queued.stdout.startswith("queued publish for model model")
        assert "acts on it when it reads it" in queued.stdout
        ack = ack_of(config, command_id(queued.stdout))
        assert (ack["outcome"], ack["reason"]) == (
            "done",
            "nothing learnt since version 1; it stays the champion",
        )
        assert service.stop() == 0


def test_stale_foreign_and_premature_commands_are_not_acted_on(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    config = service_config(
        tmp_path, broker.bootstrap_servers, overrides={"control": {"max_age_s": 600}}
    )
    stale = Command("model", "pause", "stale0000", time.time() - 7200)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    producer.produce(config["topics"]["control"], key=b"model", value=encode_command(stale))
    other = Command("other-model", "pause", "other0000", time.time())
    producer.produce(config["topics"]["control"], key=b"other-model", value=encode_command(other))
    early = Command("model", "publish", "early0000", time.time())
    producer.produce(config["topics"]["control"], key=b"model", value=encode_command(early))
    assert producer.flush(30) == 0
    produce_rows(config, 100, seed=1)
    with ServiceProcess(config, tmp_path) as service:
        ack = ack_of(config, "stale0000")
        assert ack["outcome"] == "refused"
        assert (
            ack["reason"].startswith("expired: sent 7")
            and "control.max_age_s (600 s)" in ack["reason"]
        )
        # Queued commands act before the service learns anything: no model to publish yet.
        early_ack = ack_of(config, "early0000")
        assert (early_ack["outcome"], early_ack["reason"]) == (
            "refused",
            "nothing learnt yet: there is no model to publish",
        )
        service.wait_metric(LEARNT, 100, timeout=60)  # neither pause was applied
        assert service.metric(PAUSED) == 0
        # The other model's command is skipped: no ack.
        assert [a["id"] for a in acks(config)] == ["stale0000", "early0000"]
        assert service.stop() == 0
