"""The control channel's wire format, age rule and start positions (no broker)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from stream_trainer.config import load_settings
from stream_trainer.operations.app import new_state
from stream_trainer.operations.control import (
    Ack,
    Command,
    ControlChannel,
    ControlError,
    decode,
    encode_ack,
    encode_command,
    new_command,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET_ENV = {
    "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": "k" * 32,
    "STREAM_TRAINER_KAFKA__SASL_PASSWORD": "p",
}


def test_a_command_round_trips_with_a_unique_id_and_its_time() -> None:
    first = new_command("m", "pause", clock=lambda: 1000.0)
    second = new_command("m", "pause", clock=lambda: 1000.0)
    assert first.id and second.id and first.id != second.id
    decoded = decode(encode_command(first), partition=0, offset=7)
    assert decoded == Command("m", "pause", first.id, 1000.0, 0, 7)


def test_an_unknown_command_is_refused_before_sending() -> None:
    with pytest.raises(ControlError, match="unknown command 'stop'"):
        new_command("m", "stop")


def test_an_ack_round_trips_including_offset_zero() -> None:
    ack = Ack("abc", "m", "retrain", "refused", "retrain needs full_batch", 5.0, 0, 0)
    assert decode(encode_ack(ack)) == ack


def test_an_old_format_command_is_read_with_the_record_time() -> None:
    old = json.dumps({"model": "m", "command": "publish"}).encode()
    assert decode(old, 0, 3, timestamp_s=42.0) == Command("m", "publish", None, 42.0, 0, 3)
    assert decode(old, 0, 3) == Command("m", "publish", None, None, 0, 3)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b"[1]",
        json.dumps({"command": "pause"}).encode(),  # no model
        json.dumps({"model": "m", "command": "stop"}).encode(),
        json.dumps({"type": "other", "model": "m", "command": "pause"}).encode(),
        json.dumps({"type": "ack", "model": "m", "command": "pause", "outcome": "ok"}).encode(),
    ],
)
def test_malformed_records_decode_to_none(value: bytes) -> None:
    assert decode(value) is None


def _channel(**kw: object) -> ControlChannel:
    # Construction does no I/O: nothing listens on this address.
    return ControlChannel(
        {"bootstrap.servers": "127.0.0.1:9", "group.id": "g"},
        "t",
        "m",
        **kw,  # type: ignore[arg-type]
    )


def test_commands_older_than_max_age_are_stale_others_not() -> None:
    channel = _channel(max_age_s=60.0, clock=lambda: 10_000.0)
    try:
        assert channel._stale(Command("m", "pause", "a", 9_950.0)) is None
        assert channel._stale(Command("m", "pause", "a", 20_000.0)) is None  # sender ahead
        assert channel._stale(Command("m", "pause", "a", None)) is None
        reason = channel._stale(Command("m", "retrain", "a", 9_000.0))
        assert reason is not None
        assert "expired: sent 1000 s ago" in reason and "control.max_age_s (60 s)" in reason
    finally:
        channel.close()


def test_start_positions_follow_the_checkpoint_else_the_rule() -> None:
    fresh = _channel()
    upgraded = _channel(from_end=True)
    resumed = _channel(resume_from={0: 12}, from_end=True)
    try:
        assert fresh._start(0, 5, 20) == 5  # a new model: queued commands count (age rule)
        assert upgraded._start(0, 5, 20) == 20  # pre-control-offsets checkpoint: old rule
        assert resumed._start(0, 5, 20) == 12
        assert resumed._start(0, 15, 20) == 15  # retention deleted unread commands
        assert resumed._start(1, 5, 20) == 20  # a partition it never read
    finally:
        for channel in (fresh, upgraded, resumed):
            channel.close()


def test_a_checkpoint_from_before_control_offsets_loads_with_defaults() -> None:
    settings = load_settings(ROOT / "configs" / "per-record.yaml", env=SECRET_ENV)
    state = new_state(settings)
    for name in ("control_offsets", "paused", "acks_owed"):
        del state.__dict__[name]
    restored = pickle.loads(pickle.dumps(state))
    assert restored.control_offsets is None
    assert restored.paused is False
    assert restored.acks_owed is None


@pytest.mark.parametrize("seconds", ["0", "-1", "soon"])
def test_wait_must_be_positive_seconds(seconds: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_trainer", "control", "pause", "--wait", seconds],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--wait" in result.stderr
