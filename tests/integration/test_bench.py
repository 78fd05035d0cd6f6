"""Smoke run of ``stream-trainer bench``: tiny workload, one repeat, JSON report complete.

Timing is not asserted (shared CI machines); only that every stage ran and reported sane,
positive numbers, so the command never rots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_trainer.cli import main
from stream_trainer.laptop.benchmarks import scale_out
from stream_trainer.laptop.benchmarks.store import BUCKET
from stream_trainer.laptop.benchmarks.workload import default_config
from stream_trainer.laptop.datasets import TRANSACTIONS_FEATURES
from stream_trainer.testing.schema_registry import SchemaRegistry
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import BrokerHandle

pytestmark = pytest.mark.integration

RECORDS = 3000


def _bench(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main(["bench", "--records", str(RECORDS), "--repeats", "1", "--json", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    report: dict[str, Any] = json.loads(out)
    return report


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value) and value > 0


def test_bench_per_record_reports_every_section(
    broker: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check(
        _bench(
            capsys,
            "--bootstrap-servers",
            broker.bootstrap_servers,
            "--mode",
            "per_record",
            "--features",
            "5",
            "--workdir",
            str(tmp_path),
        ),
        "per_record",
    )


def test_bench_mini_batch_reports_every_section(
    tansu_broker: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check(
        _bench(
            capsys,
            "--bootstrap-servers",
            tansu_broker.bootstrap_servers,
            "--mode",
            "mini_batch",
            "--features",
            "5",
            "--workdir",
            str(tmp_path),
        ),
        "mini_batch",
    )


def test_bench_full_batch_reports_its_retrains(
    kafka_broker: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _bench(
        capsys,
        "--bootstrap-servers",
        kafka_broker.bootstrap_servers,
        "--mode",
        "full_batch",
        "--features",
        "5",
        "--workdir",
        str(tmp_path),
    )
    _check(report, "full_batch")
    figures = report["service"]["full_batch"]
    # Whether the first retrain (due at min_records) finishes within 3000 records depends on
    # the machine, so only the section's shape and "no rebalance" are asserted here.
    assert figures["retrains"]["median"] >= 0, figures
    assert figures["revokes_or_losses"]["median"] == 0, figures
    assert {"rate_during_retrain", "rate_without_retrain", "ratio"} <= set(figures)
    assert report["targets"]["revokes_or_losses"]["met"] is True


def test_bench_profile_names_where_the_poll_thread_spends_its_time(
    tansu_broker: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Enough records for the service to learn for ~1 s at 100 samples/s.
    code = main(
        [
            "bench",
            "--records",
            "30000",
            "--repeats",
            "1",
            "--json",
            "--bootstrap-servers",
            tansu_broker.bootstrap_servers,
            "--mode",
            "per_record",
            "--features",
            "5",
            "--workdir",
            str(tmp_path / "work"),
            "--profile",
            str(tmp_path / "profile"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    profile = json.loads(out)["service"]["profile"]
    print(json.dumps(profile, indent=2))
    (raw,) = profile["raw_stacks"]
    assert Path(raw).parent == tmp_path / "profile"
    assert "Service.step" in Path(raw).read_text()
    assert profile["loop_samples"] > 0
    # per_record's poll loop is mostly River's predict_one / learn_one.
    assert profile["shares"]["river (learner library)"] > 0
    assert 0 < profile["learner_share"] < 1
    assert sum(profile["shares"].values()) == pytest.approx(1.0)


def test_bench_members_report_scaling_and_the_rebalance_pause(
    kafka_broker: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Apache Kafka: its cooperative rebalance takes ~1 s (Tansu's ~10 s would need millions
    # of records). The members read a topic of their own, long enough for a member starting,
    # a join, two 1-second windows and a leave at per_record's pace.
    report = _bench(
        capsys,
        "--bootstrap-servers",
        kafka_broker.bootstrap_servers,
        "--mode",
        "per_record",
        "--features",
        "5",
        "--members",
        "1,2",
        "--scope",
        "partition",
        "--members-window",
        "1",
        "--members-records",
        "1500000",
        "--workdir",
        str(tmp_path),
    )
    targets = {
        "scaling_efficiency_2_members",
        "join_1to2_unmoved_pause_units",
        "leave_2to1_unmoved_pause_units",
    }
    _check(report, "per_record", partitions=6, extra_targets=targets)
    section = report["scale_out"]
    print(json.dumps({k: v for k, v in section.items() if k != "per_repeat"}, indent=2))
    assert section["members"] == [1, 2] and section["records"] == 1_500_000
    for count in ("1", "2"):
        assert _positive(section["records_per_s"][count]["median"]), section
        assert _positive(section["vs_ceilings"][count]["learner_ceiling"]), section
    assert _positive(section["efficiency"]["2"]["median"])
    assert _positive(section["cpu_ceiling"]["median"])
    assert _positive(section["median_unit_s"]["median"])
    join, leave = section["changes"]
    assert (join["kind"], join["members"], leave["kind"], leave["members"]) == (
        "join",
        [1, 2],
        "leave",
        [2, 1],
    )
    for change in (join, leave):
        # cooperative-sticky moves half of the six partitions and leaves the rest alone.
        assert change["moved_partitions"] == 3, change
        assert change["unmoved_partitions"] == 3, change
        assert _positive(change["handover_s"]["median"]), change
        # The revoke callback lasts from its counter's rise to its log line: >= 0.
        assert change["worst_revoke_s"]["median"] >= 0, change
        assert _positive(change["worst_unmoved_gap_s"]["median"]), change
        assert _positive(change["worst_baseline_gap_s"]["median"]), change
        assert change["worst_loop_gap_s"]["median"] > 0, change
    member_yaml = yaml.safe_load((tmp_path / "run-2" / "member-2.yaml").read_text())
    assert member_yaml["model"]["scope"] == "partition"
    assert member_yaml["topics"]["control"] is None
    assert any("scale-out (scope partition" in line for line in scale_out.table_lines(section))


def test_bench_transactions_runs_the_typed_contract(
    tansu_broker: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _bench(
        capsys,
        "--bootstrap-servers",
        tansu_broker.bootstrap_servers,
        "--dataset",
        "transactions",
        "--workdir",
        str(tmp_path),
    )
    _check(report, "per_record", features=8, dataset="transactions")
    service_yaml = yaml.safe_load((tmp_path / "run-0" / "service.yaml").read_text())
    assert service_yaml["record"]["features"] == [dict(f) for f in TRANSACTIONS_FEATURES]


def test_bench_transactions_as_avro_through_the_registry(
    tansu_broker: BrokerHandle,
    schema_registry: SchemaRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = _bench(
        capsys,
        "--bootstrap-servers",
        tansu_broker.bootstrap_servers,
        "--mode",
        "mini_batch",
        "--dataset",
        "transactions",
        "--format",
        "avro",
        "--schema-registry",
        schema_registry.url,
        "--workdir",
        str(tmp_path),
    )
    _check(report, "mini_batch", features=8, dataset="transactions", value_format="avro")
    service_yaml = yaml.safe_load((tmp_path / "run-0" / "service.yaml").read_text())
    assert service_yaml["record"]["format"] == "avro"
    assert service_yaml["schema_registry"]["url"] == schema_registry.url


def test_bench_store_s3_reports_checkpoint_and_publish_shares_on_both_stores(
    s3_server: SeaweedFS,
    tansu_broker: BrokerHandle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # s3_server makes sure the cached weed binary exists; the bench starts its own server
    # from it, as a user's `bench --store s3` does. Publishing every 1000 records gives
    # each run uploads within 3000 records (the built-in config publishes every 250k).
    config = default_config("per_record")
    config["registry"] = {"publish_every_records": 1000, "publish_every_seconds": 300.0}
    config_path = tmp_path / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config))
    report = _bench(
        capsys,
        "--bootstrap-servers",
        tansu_broker.bootstrap_servers,
        "--features",
        "5",
        "--config",
        str(config_path),
        "--workdir",
        str(tmp_path / "work"),
        "--store",
        "s3",
    )
    _check(
        report,
        "per_record",
        extra_targets={"checkpoint_publish_share_disk", "checkpoint_publish_share_s3"},
    )
    store = report["store"]
    assert store["on_s3"] == ["registry", "checkpoints"]
    for name in ("disk", "s3"):
        assert _positive(store[name]["records_per_s"]["median"]), name
        costs = {key: figures["median"] for key, figures in store[name]["costs"].items()}
        for share in ("checkpoint_share", "publish_share", "object_store_share"):
            assert 0 <= costs[share] <= 1, (name, share, costs)
        assert costs["checkpoint_publish_share"] == pytest.approx(
            costs["checkpoint_share"] + costs["publish_share"]
        )
        assert costs["publishes"] >= 1, (name, costs)  # publish_duration_seconds observed
        assert costs["publish_share"] > 0, (name, costs)
        assert report["targets"][f"checkpoint_publish_share_{name}"]["target"] == "<= 0.05"
    disk = {key: figures["median"] for key, figures in store["disk"]["costs"].items()}
    s3 = {key: figures["median"] for key, figures in store["s3"]["costs"].items()}
    # On disk the registry is a folder: no object-store request, no upload quantile.
    assert disk["object_store_requests"] == 0 and disk["upload_p50_s"] is None, disk
    # On S3 every publish uploaded (artifact, metadata, lease renewal...), and nothing failed.
    assert s3["uploads"] >= s3["publishes"] >= 1, s3
    assert s3["object_store_share"] > 0 and s3["object_store_failures"] == 0, s3
    assert math.isfinite(s3["upload_p99_s"]) and s3["upload_p99_s"] >= s3["upload_p50_s"] > 0
    assert s3["upload_p99_s"] < 30, s3  # within the histogram's finite buckets
    assert _positive(store["s3_vs_disk_rate"]["median"])
    # The s3 run's service really had its registry on the bucket.
    s3_yaml = yaml.safe_load((tmp_path / "work" / "run-1" / "service.yaml").read_text())
    assert s3_yaml["registry"]["root"].startswith(f"s3://{BUCKET}/")
    assert s3_yaml["checkpoint"]["dir"].startswith(f"s3://{BUCKET}/")


def test_bench_decode_only_rates_every_path_against_numeric_json(
    schema_registry: SchemaRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "bench",
            "--decode-only",
            "--records",
            "2000",
            "--repeats",
            "2",
            "--json",
            "--schema-registry",
            schema_registry.url,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert report["workload"]["schemas"] == "registry"
    assert report["workload"]["dataset"] == "transactions"
    assert report["workload"]["records"] == 2000
    assert set(report["paths"]) == {"numeric_json", "typed_json", "avro", "json_schema"}
    for name, path in report["paths"].items():
        assert _positive(path["records_per_s"]["median"]), name
        assert len(path["records_per_s"]["runs"]) == 2
        assert _positive(path["bytes_per_record"]), name
    assert set(report["ratios"]) == set(report["targets"]) == {"typed_json", "avro", "json_schema"}
    for name, value in report["ratios"].items():
        medians = report["paths"]
        expected = (
            medians[name]["records_per_s"]["median"]
            / (medians["numeric_json"]["records_per_s"]["median"])
        )
        assert value == pytest.approx(expected), name
        assert report["targets"][name]["met"] == (value >= 0.8)


def _check(
    report: dict[str, Any],
    mode: str,
    *,
    features: int = 5,
    dataset: str = "linear5",
    value_format: str = "json",
    partitions: int = 1,
    extra_targets: frozenset[str] | set[str] = frozenset(),
) -> None:

    assert set(report) >= {
        "machine",
        "workload",
        "config",
        "stages",
        "ratios",
        "service",
        "targets",
        "repeats",
    }
    assert report["workload"] == {
        **report["workload"],
        "mode": mode,
        "records": RECORDS,
        "features": features,
        "dataset": dataset,
        "format": value_format,
        "partitions": partitions,
    }
    for stage in ("ingest_ceiling", "learner_ceiling", "naive", "service"):
        rate = report["stages"][stage]["records_per_s"]
        assert _positive(rate["median"]), (stage, rate)
        assert rate["min"] <= rate["median"] <= rate["max"]
        assert len(rate["runs"]) == 1
    # The learner ceiling brackets the service: one run right before it, one right after.
    bracket = report["stages"]["learner_ceiling"]["extra"]
    assert _positive(bracket["before_per_s"]["median"]), bracket
    assert _positive(bracket["after_per_s"]["median"]), bracket
    assert all(_positive(v) for v in report["ratios"].values()), report["ratios"]
    # With one repeat, the per-repeat ratio is the ratio of the medians.
    for name, value in report["ratios"].items():
        paired = report["ratios_per_repeat"][name]
        assert paired["median"] == pytest.approx(value), (name, paired, value)
    service = report["service"]
    assert service["exit_codes"] == [0]  # stopped gracefully after learning everything
    assert _positive(service["startup_s"]["median"])
    assert _positive(service["rss"]["peak_bytes"]["median"])
    assert isinstance(service["rss"]["growth_pct"]["median"], float)  # null if unknown
    # The graceful stop writes a final checkpoint, whatever the periodic ones did.
    assert service["checkpoint"]["files_after_stop"]["median"] >= 1
    assert _positive(service["checkpoint"]["newest_file_bytes"]["median"])
    loop = service["learn_loop"]
    assert _positive(loop["records_per_s"]["median"]), loop
    assert _positive(loop["vs_learner_ceiling"]["median"]), loop
    shares = service["time_shares"]
    if mode != "full_batch":  # full_batch learns in its fit worker, outside the loop
        assert 0 < shares["learn"]["median"] <= 1.5, shares
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["python"].startswith("3.")
    assert "river" in machine["libraries"]
    expected = {
        "per_record": {"service_vs_learner_ceiling", "service_vs_naive"},
        "mini_batch": {"service_vs_ingest_ceiling", "service_vs_naive"},
        "full_batch": {"ingest_during_retrain_vs_without", "revokes_or_losses"},
    }[mode]
    assert set(report["targets"]) == expected | {"rss_growth_pct"} | extra_targets, report[
        "targets"
    ]
