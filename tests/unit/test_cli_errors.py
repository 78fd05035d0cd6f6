"""The real ``stream-trainer`` command fails with one line on stderr, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_trainer.state.checkpoint import CheckpointStore
from stream_trainer.testing.counting import FEATURES, RIVER_PATH
from stream_trainer.training.learners import TESTING_ENV

REPO = Path(__file__).resolve().parents[2]


def run_cli(
    *words: str, env: Mapping[str, str] | None = None, stdout: Any = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """``python -m stream_trainer WORDS`` in a subprocess, bounded to 60 s."""
    return subprocess.run(
        [sys.executable, "-m", "stream_trainer", *words],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def assert_one_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g"},
        "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
        "record": {"features": ["a"], "labels": [0, 1]},
        "model": {
            "name": "m",
            "task": "binary_classification",
            "learner": {"path": "river.linear_model.LogisticRegression"},
        },
        "training": {"mode": "per_record"},
        "checkpoint": {"dir": str(tmp_path / "checkpoints"), "allow_unsigned": True},
        "registry": {"root": str(tmp_path / "registry")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("value", ["a,b", " a , b ", '["a", "b"]'])
def test_env_list_accepts_comma_separated_and_json(config: Path, value: str) -> None:
    result = run_cli(
        "validate-config", "--config", str(config), env={"STREAM_TRAINER_TOPICS__INPUT": value}
    )
    assert result.returncode == 0, result.stderr
    assert '"input": [\n      "a",\n      "b"\n    ]' in result.stdout


def test_env_list_labels_keep_their_json_type(config: Path) -> None:
    result = run_cli(
        "validate-config", "--config", str(config), env={"STREAM_TRAINER_RECORD__LABELS": "0,1"}
    )
    assert result.returncode == 0, result.stderr
    assert '"labels": [\n      0,\n      1\n    ]' in result.stdout


def test_env_list_unreadable_names_the_variable_and_the_forms(config: Path) -> None:
    result = run_cli(
        "validate-config", "--config", str(config), env={"STREAM_TRAINER_TOPICS__INPUT": "[a,b"}
    )
    print(result.stderr)
    assert result.returncode == 1
    assert_one_line(result.stderr)
    assert "STREAM_TRAINER_TOPICS__INPUT" in result.stderr
    assert "comma-separated list" in result.stderr and "JSON list" in result.stderr


def test_env_dict_unreadable_names_the_variable(config: Path) -> None:
    result = run_cli(
        "validate-config", "--config", str(config), env={"STREAM_TRAINER_KAFKA__EXTRA": "x"}
    )
    assert result.returncode == 1
    assert_one_line(result.stderr)
    assert "STREAM_TRAINER_KAFKA__EXTRA" in result.stderr


def test_produce_unknown_dataset_lists_the_datasets() -> None:
    result = run_cli(
        "produce", "--bootstrap-servers", "127.0.0.1:9", "--topic", "t", "--dataset", "foo"
    )
    assert result.returncode == 2
    assert_one_line(result.stderr)
    assert "'foo'" in result.stderr and "phishing" in result.stderr


def test_produce_avro_without_a_registry_is_a_usage_error() -> None:
    result = run_cli(
        "produce", "--bootstrap-servers", "127.0.0.1:9", "--topic", "t", "--format", "avro"
    )
    assert result.returncode == 2
    assert_one_line(result.stderr)
    assert "--schema-registry" in result.stderr


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_produce_to_unreachable_broker_fails_in_bounded_time(closed_port: int) -> None:
    bootstrap = f"127.0.0.1:{closed_port}"
    # The same command refused before it connects: the interpreter's start-up and imports,
    # measured now, so the bound below holds on a loaded machine too.
    started = time.monotonic()
    run_cli("produce", "--bootstrap-servers", bootstrap, "--topic", "t", "--format", "avro")
    start_up = time.monotonic() - started
    started = time.monotonic()
    result = run_cli("produce", "--bootstrap-servers", bootstrap, "--topic", "t", "--timeout", "3")
    elapsed = time.monotonic() - started
    print(
        f"unreachable broker: exit {result.returncode} after {elapsed:.1f} s "
        f"(start-up alone {start_up:.1f} s): {result.stderr}"
    )
    assert result.returncode == 1
    assert_one_line(result.stderr)  # librdkafka's own retry lines are silenced
    assert bootstrap in result.stderr
    # Gives up after its 3 s timeout (no retry loop of its own): start-up + 3 s + slack.
    assert elapsed < 2 * start_up + 3 + 8


def test_checkpoint_inspect_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, None, allow_unsigned=True, keep_last=10)
    for n in range(3):
        fields: dict[str, Any] = {
            "offsets": {"in:0": n},
            "model_version": None,
            "config_hash": "c" * 64,
            "records_learnt": n,
            "metrics": {},
            "extra": {},
        }
        store.write(store.serialize({"n": n}), fields)
    # The reader is gone before the command writes: what `| head` does to a long output.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_cli("checkpoint", "inspect", str(tmp_path), "--all", stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_run_refuses_the_counting_learner_without_its_switch(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test-only learner in a config fails ``run`` at start, naming the field; the
    switch admits it (validate-config builds the model the same way)."""
    monkeypatch.delenv(TESTING_ENV, raising=False)
    data = yaml.safe_load(config.read_text())
    data["record"] = {"features": list(FEATURES)}
    data["model"].update(task="regression", learner={"path": RIVER_PATH})
    config.write_text(yaml.safe_dump(data))
    refused = run_cli("run", "--config", str(config))
    assert refused.returncode == 1, refused.stderr
    assert_one_line(refused.stderr)
    assert "cannot start: model.learner.path:" in refused.stderr
    assert f"{TESTING_ENV}=1" in refused.stderr
    admitted = run_cli("validate-config", "--config", str(config), env={TESTING_ENV: "1"})
    assert admitted.returncode == 0, admitted.stderr
