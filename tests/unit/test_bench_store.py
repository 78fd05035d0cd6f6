"""bench --store s3: shares of run time and upload quantiles from the service's metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.cli import main
from stream_trainer.laptop.benchmarks.service_run import Sample, ServiceRun
from stream_trainer.laptop.benchmarks.store import costs, merge, s3_config

H = "stream_trainer_object_store_request_seconds"


def _run(final: dict[str, float]) -> ServiceRun:
    # 1000 records learnt at 100/s: a wall time of 10 s.
    run = ServiceRun(total=1000, started=0.0)
    for t, learnt in ((0.0, 0.0), (1.0, 100.0), (9.0, 900.0), (11.0, 1000.0)):
        run.samples.append(Sample(t, learnt, math.nan, False))
    run.final = final
    return run


def _histogram(operation: str, counts: dict[str, float], total_s: float) -> dict[str, float]:
    """Keys as the service's /metrics gives them after parsing (labels sorted)."""
    out = {f'{H}_bucket{{le="{le}",operation="{operation}"}}': n for le, n in counts.items()}
    out[f'{H}_count{{operation="{operation}"}}'] = counts["+Inf"]
    out[f'{H}_sum{{operation="{operation}"}}'] = total_s
    return out


def test_shares_are_of_the_learning_wall_time_and_uploads_sum_every_put_kind() -> None:
    final = {
        "stream_trainer_checkpoint_duration_seconds_sum": 0.2,
        "stream_trainer_checkpoint_duration_seconds_count": 2.0,
        "stream_trainer_publish_duration_seconds_sum": 0.3,
        "stream_trainer_publish_duration_seconds_count": 1.0,
        **_histogram("put_if_absent", {"0.001": 0.0, "0.005": 2.0, "+Inf": 2.0}, 0.006),
        **_histogram("put_if_match", {"0.001": 0.0, "0.005": 1.0, "0.01": 2.0, "+Inf": 2.0}, 0.01),
        # Reads are in the object-store share but are not uploads.
        **_histogram("get", {"0.001": 10.0, "0.005": 10.0, "+Inf": 10.0}, 0.004),
        'stream_trainer_object_store_request_failures_total{operation="put"}': 0.0,
    }
    figures = costs(_run(final))
    assert figures["wall_s"] == pytest.approx(10.0)
    assert figures["checkpoint_share"] == pytest.approx(0.02)
    assert figures["publish_share"] == pytest.approx(0.03)
    assert figures["checkpoint_publish_share"] == pytest.approx(0.05)
    assert figures["object_store_share"] == pytest.approx(0.002)
    assert (figures["uploads"], figures["object_store_requests"]) == (4.0, 14.0)
    # 4 uploads: 3 in (1, 5] ms, 1 in (5, 10] ms; p50 = rank 2 of 3 in the first bucket.
    assert figures["upload_p50_s"] == pytest.approx(0.001 + 0.004 * 2 / 3)
    assert 0.005 < figures["upload_p99_s"] <= 0.01
    assert figures["object_store_failures"] == 0


def test_a_run_on_disk_has_no_upload_quantiles() -> None:
    figures = costs(_run({"stream_trainer_checkpoint_duration_seconds_sum": 0.1}))
    assert figures["object_store_share"] == 0 and figures["uploads"] == 0
    assert math.isnan(figures["upload_p50_s"]) and math.isnan(figures["upload_p99_s"])


def test_s3_config_moves_the_registry_and_keeps_keys_out_of_the_config() -> None:
    class Server:
        endpoint_url = "http://127.0.0.1:9000"
        region = "us-east-1"

    base: dict[str, Any] = {
        "registry": {"root": "/local", "keep_last": 5},
        "checkpoint": {"dir": "/ck"},
    }
    config = merge(base, s3_config(Server(), "run-0"))  # type: ignore[arg-type]
    assert config["registry"] == {
        "root": "s3://stream-trainer-bench/run-0/registry",
        "keep_last": 5,
    }
    assert config["checkpoint"] == {"dir": "s3://stream-trainer-bench/run-0/checkpoints"}
    assert config["object_store"]["path_style"] is True
    assert not any("key" in name for name in config["object_store"])
    assert base["registry"]["root"] == "/local"  # merge copies


def test_without_the_built_server_the_bench_says_how_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAM_TRAINER_CACHE", str(tmp_path / "cache"))
    # An unreachable broker: the bench must stop before it is used, and never build.
    argv = ["bench", "--store", "s3", "--records", "10", "--bootstrap-servers", "127.0.0.1:1"]
    assert main(argv) == 2
    assert "make s3-server" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
