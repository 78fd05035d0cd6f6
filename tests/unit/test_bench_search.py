"""``bench --search``: its refusals and its trials-per-minute stage on a small window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_trainer.laptop.benchmarks import report as rep
from stream_trainer.laptop.benchmarks import search as bench_search
from stream_trainer.laptop.benchmarks.workload import (
    InMemory,
    Paths,
    default_config,
    record_section,
    service_config,
    settings_of,
    workload_dataset,
)


def test_cli_refuses_a_search_bench_of_another_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from stream_trainer.cli import main

    assert main(["bench", "--search", "--mode", "per_record"]) == 2
    assert "--search runs full_batch" in capsys.readouterr().err
    assert main(["bench", "--search", "--search-workers", "0"]) == 2


def test_trials_per_minute_with_one_and_two_workers(tmp_path: Path) -> None:
    dataset = workload_dataset(4)
    base = default_config("full_batch")
    base["training"]["full_batch"]["window_records"] = 600
    base["training"]["full_batch"]["search"] = bench_search.search_section(2, 3)
    paths = Paths(
        "localhost:9092", "in", "dlq", "v", "c", "g", tmp_path / "ck", tmp_path / "reg", 1
    )  # type: ignore[operator]
    settings = settings_of(
        service_config(base, record_section(dataset), paths, "full_batch"), "k" * 32
    )
    rng = np.random.default_rng(0)
    X = rng.standard_normal((800, 4))
    data = InMemory(X, X[:, 0] > 0)
    messages: list[str] = []
    figures = bench_search.trials_per_minute(data, settings, 2, 3, 1, messages.append)
    assert figures["window_records"] == 600
    per_minute = figures["trials_per_minute"]
    assert per_minute["1"]["median"] > 0 and per_minute["2"]["median"] > 0
    assert figures["speedup"]["median"] == pytest.approx(
        per_minute["2"]["median"] / per_minute["1"]["median"]
    )
    assert figures["pool_start_s"] > 0
    assert any("2 worker(s)" in m for m in messages)
    targets = rep.targets("full_batch", {}, {}, figures)
    assert targets["search_speedup_2_workers"]["target"] == ">= 1.7"
