"""``kill -9`` around a control command: it takes effect once and is acknowledged."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_trainer.operations.control import send_command
from stream_trainer.operations.faults import CRASH_ENV
from tests.conftest import BrokerHandle
from tests.harness import ServiceProcess, service_config, wait_for
from tests.integration.test_control import (
    LEARNT,
    PAUSED,
    ack_of,
    acks,
    command_id,
    control,
    produce_rows,
)

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("point", ["after_command", "before_ack"])
def test_a_crash_around_a_queued_pause_pauses_once_and_acks_it(
    point: str, broker: BrokerHandle, tmp_path: Path
) -> None:
    config = service_config(tmp_path, broker.bootstrap_servers)
    pause = send_command(
        {"bootstrap.servers": broker.bootstrap_servers},
        config["topics"]["control"],
        config["model"]["name"],
        "pause",
    )
    produce_rows(config, 100, seed=1)
    crashing = ServiceProcess(config, tmp_path, env={CRASH_ENV: f"{point}:1"}, name="crashing")
    crashing.start()
    wait_for(lambda: not crashing.alive(), 90, f"the crash at {point}")
    assert crashing.proc is not None and crashing.proc.returncode == -9, crashing.tail()
    assert acks(config) == []  # killed before any ack

    # after_command: the pause is read and acted on again; before_ack: it is in the
    # checkpoint and only its owed ack is sent. Either way: paused, one ack.
    with ServiceProcess(config, tmp_path, name="recovered") as service:
        assert ack_of(config, pause.id)["outcome"] == "done"
        service.wait_metric(PAUSED, 1, timeout=60)
        assert service.metric(LEARNT) == 0
        resumed = control(service, "resume", "--wait", "60")
        assert resumed.returncode == 0, resumed.stderr
        assert [a["id"] for a in acks(config)] == [pause.id, command_id(resumed.stdout)]
        service.wait_metric(LEARNT, 100, timeout=60)
        assert service.stop() == 0
