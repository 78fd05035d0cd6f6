"""The config tree: examples load, mistakes name their field, env overrides, secrets masked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_trainer.config import ConfigError, load_settings, settings_from_mapping
from stream_trainer.training.learners import build_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SECRET_ENV = {
    "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": "hmac-key-that-must-never-print",
    "STREAM_TRAINER_KAFKA__SASL_PASSWORD": "sasl-password-that-must-never-print",
    "STREAM_TRAINER_SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD": "registry-password-never-printed",
}


def _base() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_there_is_an_example_per_mode() -> None:
    modes = {yaml.safe_load(p.read_text())["training"]["mode"] for p in CONFIGS}
    assert modes == {"per_record", "mini_batch", "full_batch"}
    assert (ROOT / "configs" / "local.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_loads_and_builds_its_model(path: Path) -> None:
    settings = load_settings(path, env=SECRET_ENV)
    model = build_model(settings)  # learner compatibility is part of "valid"
    assert model.describe()["mode"] == settings.training.mode


def _error(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, env=env or {})
    return str(info.value)


def test_unknown_nested_key_names_its_path() -> None:
    data = _base()
    data["training"]["mini_batch"] = {"size": 10, "max_wiat_s": 3}
    message = _error(data)
    assert "training.mini_batch.max_wiat_s" in message
    assert "unknown key" in message


def test_unknown_top_level_key_names_it() -> None:
    data = _base()
    data["checkpiont"] = {}
    assert "checkpiont: unknown key" in _error(data)


def test_wrong_type_names_the_field() -> None:
    data = _base()
    data["kafka"]["session_timeout_ms"] = "soon"
    assert "kafka.session_timeout_ms" in _error(data)


def test_missing_required_field_names_it() -> None:
    data = _base()
    del data["kafka"]["group_id"]
    assert "kafka.group_id: required field is missing" in _error(data)


def test_invalid_enum_lists_the_allowed_values() -> None:
    data = _base()
    data["training"]["mode"] = "streaming"
    message = _error(data)
    assert "training.mode" in message
    for allowed in ("per_record", "mini_batch", "full_batch"):
        assert allowed in message


def test_env_overrides_a_nested_key_over_the_file() -> None:
    settings = settings_from_mapping(
        _base(),
        env={
            "STREAM_TRAINER_TRAINING__MINI_BATCH__SIZE": "250",
            "STREAM_TRAINER_KAFKA__GROUP_ID": "from-env",
        },
    )
    assert settings.training.mini_batch.size == 250
    assert settings.kafka.group_id == "from-env"


def test_settings_are_frozen() -> None:
    settings = settings_from_mapping(_base(), env={})
    with pytest.raises(ValueError, match="frozen"):
        settings.kafka.group_id = "x"  # type: ignore[misc]


def test_checkpoint_key_required_unless_unsigned_is_explicit() -> None:
    data = _base()
    data["checkpoint"]["allow_unsigned"] = False
    assert "no checkpoint HMAC key" in _error(data)
    settings = settings_from_mapping(data, env=SECRET_ENV)
    assert settings.checkpoint.key() == SECRET_ENV["STREAM_TRAINER_CHECKPOINT__HMAC_KEY"].encode()


def test_secret_files_are_read(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-a-mounted-secret\n")
    data = _base()
    data["checkpoint"] = {
        **data["checkpoint"],
        "allow_unsigned": False,
        "hmac_key_file": str(key_file),
    }
    assert settings_from_mapping(data, env={}).checkpoint.key() == b"from-a-mounted-secret"


def test_secrets_cannot_hide_in_the_librdkafka_passthrough() -> None:
    data = _base()
    data["kafka"]["extra"] = {"sasl.password": "plain"}
    assert "must not be set in kafka.extra" in _error(data)


def test_sasl_settings_reach_librdkafka() -> None:
    settings = load_settings(ROOT / "configs" / "per-record.yaml", env=SECRET_ENV)
    conf = settings.kafka.consumer_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.password"] == SECRET_ENV["STREAM_TRAINER_KAFKA__SASL_PASSWORD"]
    assert conf["ssl.ca.location"] == "/etc/stream-trainer/tls/ca.crt"
    assert conf["enable.auto.commit"] is False
    assert conf["enable.auto.offset.store"] is False


def test_classification_needs_declared_labels() -> None:
    data = _base()
    data["record"]["labels"] = None
    assert "record.labels" in _error(data)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_trainer", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_validate_config_masks_secrets(tmp_path: Path) -> None:
    import os

    result = _cli(
        "validate-config",
        "--config",
        str(ROOT / "configs" / "per-record.yaml"),
        env={**os.environ, **SECRET_ENV},
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["kafka"]["sasl_password"] == "**********"
    assert effective["checkpoint"]["hmac_key"] == "**********"
    assert effective["schema_registry"]["basic_auth_password"] == "**********"
    for secret in SECRET_ENV.values():
        assert secret not in result.stdout
        assert secret not in result.stderr


def test_validate_config_fails_with_exit_1_naming_the_field(tmp_path: Path) -> None:
    data = _base()
    data["model"]["learner"]["path"] = "sklearn.ensemble.RandomForestClassifier"
    data["model"]["preprocessing"] = []
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = _cli("validate-config", "--config", str(path))
    assert result.returncode == 1
    assert "model.learner" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert _cli("no-such-command").returncode == 2
    assert _cli("run", "--no-such-flag").returncode == 2


def test_every_subcommand_has_help() -> None:
    for command in (
        "run",
        "validate-config",
        "produce",
        "demo",
        "bench",
        "control",
        "checkpoint",
        "versions",
        "topics",
    ):
        result = _cli(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage: stream-trainer" in result.stdout


def test_missing_config_file_is_a_clear_failure(tmp_path: Path) -> None:
    result = _cli("validate-config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "config file not found" in result.stderr


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "key").write_text("k\n")
    data = _base()  # checkpoint.dir and registry.root are relative: var/local/...
    data["checkpoint"] = {**data["checkpoint"], "hmac_key_file": "key", "allow_unsigned": False}
    data["kafka"] = {**data["kafka"], "ssl_ca_location": "/etc/ca.crt"}
    (folder / "local.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # elsewhere: the working directory must not matter
    settings = load_settings(folder / "local.yaml", env={})
    assert settings.checkpoint.dir == folder / "var/local/checkpoints"
    assert settings.registry.root == folder / "var/local/registry"
    assert settings.checkpoint.key() == b"k"
    assert settings.kafka.ssl_ca_location == Path("/etc/ca.crt")  # absolute: unchanged
    # An environment override is taken as given (relative to the working directory).
    env = {"STREAM_TRAINER_REGISTRY__ROOT": "elsewhere"}
    assert load_settings(folder / "local.yaml", env=env).registry.root == Path("elsewhere")


def test_relative_path_given_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    settings = load_settings(Path("configs/local.yaml"), env={})
    assert settings.registry.root == ROOT / "configs" / "var/local/registry"
    assert settings.registry.root.is_absolute()
