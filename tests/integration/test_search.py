"""Hyperparameter search end to end: the real service on a real broker.

The model's configured hyperparameters are clearly wrong for the stream (a depth-1 decision
tree on ``bananas``, whose classes interleave: ~0.55 accuracy). A first run without a
search publishes that model as the champion; the second run, with a search over max_depth
1..12 enabled, retrains on the next window: the search must find a depth that scores far
better than the configured one, the winner must beat the champion at the promotion gate and
be published, and the version metadata, the metrics, the checkpoint and ``search show``
must all tell the same story.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.publishing.registry import ModelRegistry
from tests.conftest import KAFKA_ONLY, BrokerHandle
from tests.harness import HMAC_KEY, ServiceProcess, deep_merge, service_config, wait_for
from tests.integration.test_training import (
    LEARNT,
    encoded_rows,
    final_checkpoint,
    produce_values,
    retrains,
    stop_cleanly,
    wait_exact,
)

# The search's results and its worker limits: the broker only delivers (see KAFKA_ONLY).
pytestmark = [pytest.mark.integration, KAFKA_ONLY]

PUBLISHED = "stream_trainer_versions_published_total"
BEST = "stream_trainer_search_best_score"
# The searched model must beat the configured params by this much on the search's own
# validation records (measured: ~0.55 for depth 1, ~0.85 for the best depth).
MARGIN = 0.2
TRIALS = 12


def _trials(state: str) -> str:
    return f'stream_trainer_search_trials_total{{state="{state}"}}'


def _registry(config: dict[str, Any]) -> ModelRegistry:
    return ModelRegistry(
        Path(config["registry"]["root"]), config["model"]["name"], HMAC_KEY.encode(), keep_last=100
    )


def test_search_finds_better_hyperparameters_and_the_winner_passes_the_gate(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    window = 2000
    base = service_config(
        tmp_path,
        bootstrap,
        "bananas",
        "full_batch",
        overrides={
            "model": {
                "preprocessing": [],
                "learner": {
                    "path": "sklearn.tree.DecisionTreeClassifier",
                    "params": {"max_depth": 1, "random_state": 0},
                },
            },
            "training": {
                "full_batch": {
                    "window_records": window,
                    "retrain_every_records": window,
                    "retrain_on_drift": False,
                }
            },
        },
    )
    values = encoded_rows("bananas", 2 * window)
    topic = base["topics"]["input"][0]
    began = time.monotonic()

    # Run 1, no search: the configured depth-1 tree becomes the champion (version 1).
    with ServiceProcess(base, tmp_path, name="plain") as service:
        produce_values(bootstrap, topic, [(0, v) for v in values[:window]])
        wait_exact(service, LEARNT, window, timeout=60)
        service.wait_metric(PUBLISHED, 1, timeout=60)
        assert service.metric(_trials("complete")) == 0
        stop_cleanly(service)
    first = _registry(base).list()
    assert [v.version for v in first] == [1]
    assert first[0].metadata["search"] is None
    assert first[0].metadata["learner"]["params"]["max_depth"] == 1

    # Run 2, same model, search enabled (the checkpoint is kept: a search does not change
    # the config hash). The next window's count retrain searches.
    searched = deep_merge(
        base,
        {
            "training": {
                "full_batch": {
                    "search": {
                        "enabled": True,
                        "algorithm": "tpe",
                        "space": {"learner.max_depth": {"type": "int", "low": 1, "high": 12}},
                        "trials": TRIALS,
                        "validation_fraction": 0.25,
                        "seed": 0,
                    }
                }
            }
        },
    )
    config_path = tmp_path / "searched.yaml"
    with ServiceProcess(searched, tmp_path, name="searched") as service:
        produce_values(bootstrap, topic, [(0, v) for v in values[window:]])
        wait_exact(service, LEARNT, window, timeout=60)  # this run's records
        service.wait_metric(retrains("count"), 1, timeout=60)
        # The first searched version is the one judged against the depth-1 champion (a
        # later retrain may search again while the test reads).
        searched_version = wait_for(
            lambda: _first_searched(searched), timeout=120, what="a version with a search"
        )
        complete = service.wait_metric(_trials("complete"), TRIALS, timeout=60)
        failed = service.metric(_trials("failed"))
        best_metric = service.metric(BEST, -1.0)
        stop_cleanly(service)
    metadata = searched_version.metadata
    search = metadata["search"]
    best, baseline = search["best"], search["baseline_score"]
    print(
        f"[{broker.name}] search bananas: configured max_depth 1 scores {baseline:.4f}, "
        f"best max_depth {best['params']['learner.max_depth']} scores {best['score']:.4f} "
        f"({search['counts']}, {search['duration_s']:.2f} s search, "
        f"{search['refit_seconds']:.3f} s refit); gate: {search['gate']['reason']}; "
        f"{time.monotonic() - began:.1f} s"
    )
    # The search: the configured params are clearly beaten, on time-ordered validation.
    assert searched_version.version == 2
    assert search["algorithm"] == "tpe"
    assert search["metric"] == "accuracy" and search["direction"] == "maximize"
    assert search["counts"] == {"complete": TRIALS, "failed": 0, "pruned": 0}
    assert len(search["trials"]) == TRIALS
    assert all(t["seconds"] > 0 for t in search["trials"])
    assert best["score"] >= baseline + MARGIN
    assert best["params"]["learner.max_depth"] > 1
    assert search["train_records"] + search["validation_records"] < window  # minus the holdout
    # The winner went through the retrain gate against the depth-1 champion, and won.
    gate = search["gate"]
    assert gate["accepted"] is True
    assert gate["champion_score"] is not None
    assert gate["candidate_score"] > gate["champion_score"]
    assert metadata["learner"]["params"]["max_depth"] == best["params"]["learner.max_depth"]
    assert metadata["parent_version"] == 1
    # Metrics, checkpoint and `search show` agree (a later search may have run since).
    assert complete % TRIALS == 0 and failed == 0
    state = final_checkpoint(searched)
    last = state.last_search
    assert last is not None
    assert best_metric == pytest.approx(last["best"]["score"])
    shown = subprocess.run(
        [sys.executable, "-m", "stream_trainer", "search", "show", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_cli_env(),
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert printed["best"] == last["best"]
    assert printed["trials"] == last["trials"]


def _first_searched(config: dict[str, Any]) -> Any:
    """The oldest version whose metadata records a search, or None."""
    found = [v for v in _registry(config).list() if v.metadata.get("search") is not None]
    return found[0] if found else None


def _cli_env() -> dict[str, str]:
    return {**os.environ, "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY}


def test_parallel_search_with_a_memory_cap_fails_the_hog_alone(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Two trial workers and a 100 MB cap per trial. One point of the space allocates far
    past it (PolynomialFeatures of degree 400 on 2 features: 80 601 columns, ~1 GB for the
    window): those trials fail alone with MemoryError and are counted, the others go on in
    parallel and still find a depth far better than the configured one, the service keeps
    ingesting and stops cleanly, and every completed trial reports its peak memory."""
    bootstrap = broker.bootstrap_servers
    window = 2000
    config = service_config(
        tmp_path,
        bootstrap,
        "bananas",
        "full_batch",
        overrides={
            "model": {
                "preprocessing": [
                    {"path": "sklearn.preprocessing.PolynomialFeatures", "params": {"degree": 1}}
                ],
                "learner": {
                    "path": "sklearn.tree.DecisionTreeClassifier",
                    "params": {"max_depth": 1, "random_state": 0},
                },
            },
            "training": {
                "full_batch": {
                    "window_records": window,
                    "retrain_every_records": window,
                    "retrain_on_drift": False,
                    "search": {
                        "enabled": True,
                        "algorithm": "random",
                        "space": {
                            "learner.max_depth": {"type": "int", "low": 1, "high": 12},
                            "preprocessing.0.degree": {"type": "categorical", "choices": [1, 400]},
                        },
                        "trials": TRIALS,
                        "validation_fraction": 0.25,
                        "seed": 0,
                        "workers": 2,
                        "memory_limit_mb": 100,
                    },
                },
            },
        },
    )
    values = encoded_rows("bananas", window)
    config_path = tmp_path / "parallel.yaml"  # where ServiceProcess writes it
    began = time.monotonic()
    with ServiceProcess(config, tmp_path, name="parallel") as service:
        produce_values(bootstrap, config["topics"]["input"][0], [(0, v) for v in values])
        wait_exact(service, LEARNT, window, timeout=60)
        version = wait_for(
            lambda: _first_searched(config), timeout=180, what="a version with a search"
        )
        failed = service.wait_metric(_trials("failed"), 1, timeout=60)
        complete = service.metric(_trials("complete"))
        peak_bytes = service.metric("stream_trainer_search_trial_peak_memory_bytes")
        stop_cleanly(service)
    search = version.metadata["search"]
    counts, trials = search["counts"], search["trials"]
    hogs = [t for t in trials if t["params"]["preprocessing.0.degree"] == 400]
    others = [t for t in trials if t["params"]["preprocessing.0.degree"] == 1]
    print(
        f"[{broker.name}] parallel search, 2 workers, 100 MB cap: {counts}, "
        f"best {search['best']['params']} {search['best']['score']:.4f} vs configured "
        f"{search['baseline_score']:.4f}; peaks {[t['peak_memory_mb'] for t in trials]} MB; "
        f"{search['duration_s']:.2f} s search; {time.monotonic() - began:.1f} s"
    )
    assert search["workers"] == 2 and search["memory_limit_mb"] == 100
    assert hogs and others, "seed 0 draws both degrees"
    assert all(t["state"] == "failed" for t in hogs)
    assert all(t["error"].startswith("MemoryError: over the 100 MB cap") for t in hogs)
    assert all(t["state"] == "complete" for t in others)
    assert counts == {"complete": len(others), "failed": len(hogs), "pruned": 0}
    assert len(trials) == TRIALS
    # Counted: the metrics hold this search (and any later one, in whole searches).
    assert failed >= len(hogs) and complete >= len(others)
    assert search["best"]["score"] >= search["baseline_score"] + MARGIN
    assert search["gate"]["accepted"] is True
    # Peak memory: a trial process holds an interpreter with NumPy and scikit-learn (tens of
    # MB) and, here, never a GB.
    peaks = [t["peak_memory_mb"] for t in others]
    assert all(30 < p < 1000 for p in peaks), peaks
    assert search["peak_memory_mb"] == max(t["peak_memory_mb"] for t in trials)
    assert peak_bytes > 30 * 1024 * 1024
    shown = subprocess.run(
        [sys.executable, "-m", "stream_trainer", "search", "show", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_cli_env(),
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert all(
        t["peak_memory_mb"] is not None for t in printed["trials"] if t["state"] == "complete"
    )
