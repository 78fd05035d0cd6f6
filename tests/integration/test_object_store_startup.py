"""Start-up against the registry's object store (SeaweedFS): a wrong bucket, wrong keys or
a wrong port fail the start with exit 1 and one clear line naming registry.root / the
object_store field and the cause (no traceback, no secret); a store down briefly at start
is waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_trainer.laptop.embedded import free_port
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import BrokerHandle
from tests.harness import HMAC_KEY, ServiceProcess, service_config, settings_for

pytestmark = pytest.mark.integration


def _config(
    tmp_path: Path, broker: BrokerHandle, root: str, store: dict[str, Any]
) -> dict[str, Any]:
    return service_config(
        tmp_path,
        broker.bootstrap_servers,
        overrides={"registry": {"root": root}, "object_store": store},
    )


def _store_settings(server: SeaweedFS, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    settings = settings_for(server, tmp_path, server.admin)
    return {
        **settings.model_dump(mode="json", exclude_defaults=True),
        "timeout_seconds": 2.0,
        **extra,
    }


def _run_to_exit(config: dict[str, Any], tmp_path: Path, timeout: float = 90.0) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "stream_trainer", "run", "--config", str(path)],
        env={**_env(), "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stderr + result.stdout  # the log goes to stdout


def _env() -> dict[str, str]:
    # Keys only from the config's files: none from the environment running the tests.
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def _assert_one_clear_line(stderr: str, *expected: str, secret: str) -> str:
    line = next(
        (line for line in stderr.splitlines() if "cannot start" in line), f"none in {stderr}"
    )
    for text in expected:
        assert text in line, line
    assert "Traceback" not in stderr, stderr
    assert secret not in stderr
    return line


def test_a_wrong_bucket_or_wrong_keys_fail_the_start_at_once(
    s3_server: SeaweedFS, tansu_broker: BrokerHandle, tmp_path: Path
) -> None:
    secret = s3_server.admin.secret_access_key
    store = _store_settings(s3_server, tmp_path)
    config = _config(tmp_path, tansu_broker, "s3://no-such-bucket-here/models", store)
    code, stderr = _run_to_exit(config, tmp_path)
    assert code == 1, stderr
    _assert_one_clear_line(
        stderr, "registry.root s3://no-such-bucket-here/models", "NoSuchBucket", secret=secret
    )

    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret-" + secret[::-1])
    store = _store_settings(s3_server, tmp_path, secret_access_key_file=str(wrong))
    config = _config(tmp_path, tansu_broker, f"s3://{s3_server.bucket}/startup", store)
    code, stderr = _run_to_exit(config, tmp_path)
    assert code == 1, stderr
    line = _assert_one_clear_line(
        stderr, "registry.root", "SignatureDoesNotMatch", "object_store", secret=secret
    )
    assert secret[::-1] not in line


def test_a_wrong_port_fails_the_start_after_the_bounded_wait(
    s3_server: SeaweedFS, tansu_broker: BrokerHandle, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    store = _store_settings(s3_server, tmp_path, endpoint_url=endpoint, startup_wait_seconds=3.0)
    config = _config(tmp_path, tansu_broker, f"s3://{s3_server.bucket}/startup", store)
    code, stderr = _run_to_exit(config, tmp_path)
    assert code == 1, stderr
    _assert_one_clear_line(
        stderr,
        "registry.root",
        "object_store.startup_wait_seconds",
        f"object_store.endpoint_url {endpoint}",
        secret=s3_server.admin.secret_access_key,
    )
    assert (
        "waiting for the object store of registry.root" in stderr
    )  # it was retried, not failed at once


def test_a_store_down_briefly_at_start_is_waited_for(
    tansu_broker: BrokerHandle, tmp_path: Path
) -> None:
    with SeaweedFS(bucket="startup-outage") as server:
        store = _store_settings(server, tmp_path, startup_wait_seconds=120.0)
        config = _config(tmp_path, tansu_broker, f"s3://{server.bucket}/models", store)
        server.stop()
        service = ServiceProcess(config, tmp_path).start()
        try:
            service.poll_until(
                lambda: "waiting for the object store of registry.root" in service.tail(200),
                60.0,
                "the wait for the store in the log",
            )
            status, reason = service.http("/readyz")
            assert status == 503 and "object store of registry.root" in reason, (status, reason)
            server.start()
            service.wait_ready(120.0)
            assert service.stop() == 0, service.tail()
        finally:
            service.__exit__()
        assert "object store reachable" in service.tail(400)
