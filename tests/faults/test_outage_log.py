"""A broker outage under a running service keeps the log readable: repeats are held back and
counted, not written 20 times a second."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.operations.logs import REPEAT_INTERVAL_S
from tests.conftest import BrokerHandle
from tests.faults.support import (
    LEARNT,
    end_offsets,
    fault_config,
    produce_records,
    topic_of,
    wait_checkpointed,
)
from tests.harness import ServiceProcess, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

OUTAGE_S = 12.0


def _entries(lines: list[str]) -> list[dict[str, Any]]:
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            entries.append({"event": line, "level": "raw"})
    return entries


def test_broker_outage_logs_a_bounded_number_of_lines(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    config = fault_config(tmp_path, kafka_broker, 3, {"checkpoint": {"every_seconds": 0.5}})
    produce_records(config, 3000, 3)
    service = ServiceProcess(config, tmp_path).start()
    try:
        service.wait_metric(LEARNT, 3000, 60)
        kafka_broker.stop()
        try:
            before = len(service.log_path.read_text(errors="replace").splitlines())
            down = time.monotonic()

            def kafka_errors() -> float:
                return sum(
                    v
                    for k, v in service.metrics().items()
                    if k.startswith("stream_trainer_kafka_errors_total")
                )

            wait_for(lambda: kafka_errors() > 0, 60, "the service to see the broker gone")
            threading.Event().wait(max(0.0, OUTAGE_S - (time.monotonic() - down)))
            lines = service.log_path.read_text(errors="replace").splitlines()[before:]
            outage_s = time.monotonic() - down
            assert service.alive(), service.tail()
        finally:
            kafka_broker.start()
        produce_records(config, 300, 3, seed=5)
        wait_checkpointed(
            config,
            end_offsets(kafka_broker.bootstrap_servers, topic_of(config)),
            service,
            timeout=120,
        )
        assert service.stop() == 0, service.tail()
    finally:
        service.__exit__()
    entries = _entries(lines)
    loud = [e for e in entries if e.get("level") in ("warning", "error", "critical", "raw")]
    kinds = Counter(
        (e.get("logger"), e.get("level"), e.get("facility"), e.get("code")) for e in loud
    )
    held_back = sum(int(e.get("repeated", 0)) for e in loud)
    print(
        f"\n[broker outage] {outage_s:.1f} s down: {len(entries)} log lines "
        f"({len(loud)} warning/error, {len(loud) / outage_s:.1f}/s; {held_back} repeats held "
        f"back and counted); kinds {dict(kinds)}"
    )
    # Each kind of line at most once at the start and once per interval after.
    per_kind = 1 + outage_s / REPEAT_INTERVAL_S + 1
    assert all(count <= per_kind * 4 for count in kinds.values()), kinds
    assert len(loud) <= 30  # 233 (19 a second) before repeats were held back
