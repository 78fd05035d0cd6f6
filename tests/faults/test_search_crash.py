"""kill -9 of the service while a retrain's hyperparameter search runs: nothing lost, nothing
learnt twice, no trial process left behind, and the resumed retrain searches again.

The search runs in the fit worker child (and its trial processes); the poll loop keeps
learning the stream meanwhile. Killing the service mid-search must take the whole process
tree down (an orphaned trial would keep burning the core ingestion needs) and the restart
must resume from the last checkpoint exactly: the fault suite's ledger oracle, plus the
group's committed offsets on the broker, which do not read the service's own bookkeeping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stream_trainer.publishing.registry import ModelRegistry
from tests.conftest import BrokerHandle
from tests.faults.support import (
    ASSIGNED,
    committed_offsets,
    end_offsets,
    fault_config,
    judge,
    load_final,
    manifest_offsets,
    produce_records,
    topic_of,
    wait_checkpointed,
)
from tests.harness import HMAC_KEY, ServiceProcess, deep_merge, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RECORDS = 9_000
WINDOW = 3_000
RETRAINING = 'stream_trainer_state{stream_trainer_state="retraining"}'
COMPLETE = 'stream_trainer_search_trials_total{state="complete"}'


def _search(trials: int, timeout_s: float | None) -> dict[str, Any]:
    return {
        "model": {
            "preprocessing": [],
            "learner": {"path": "sklearn.linear_model.LogisticRegression", "params": {"C": 1e-4}},
        },
        "training": {
            "mode": "full_batch",
            "full_batch": {
                "window_records": WINDOW,
                "retrain_every_records": WINDOW,
                "retrain_on_drift": False,
                "search": {
                    "enabled": True,
                    "algorithm": "random",
                    "space": {
                        "learner.C": {"type": "float", "low": 1e-4, "high": 1e4, "log": True}
                    },
                    "trials": trials,
                    "timeout_s": timeout_s,
                    "seed": 0,
                },
            },
        },
        "checkpoint": {"every_seconds": 0.5, "every_records": 1000, "keep_last": 50},
        "registry": {"publish_every_records": None, "publish_every_seconds": None},
    }


def _descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (Linux /proc children lists, all threads)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = {int(k) for k in children.read_text().split()}
            except OSError:  # the thread or process ended while we read
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_kill_during_a_search_loses_and_repeats_nothing(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    # A search that cannot end before the kill: thousands of trials, a minute of budget.
    config = fault_config(tmp_path, kafka_broker, 1, _search(trials=100_000, timeout_s=120))
    produce_records(config, RECORDS, 1)
    ends = end_offsets(kafka_broker.bootstrap_servers, topic_of(config))

    crashing = ServiceProcess(config, tmp_path, name="crashing").start()
    try:
        crashing.wait_metric(RETRAINING, 1, timeout=90)
        # Some trials have run in the worker, none has been reported (the search is one job).
        tree = _descendants(crashing.pid)
        assert tree, "the fit worker should be a child of the service"
        assert crashing.metric(COMPLETE) == 0
        crashing.kill()
    finally:
        crashing.__exit__()
    wait_for(
        lambda: not any(_alive(p) for p in tree),
        timeout=15,
        what=f"the search's processes {sorted(tree)} to die with the service",
    )
    at_crash = manifest_offsets(config)
    committed = committed_offsets(
        kafka_broker.bootstrap_servers, config["kafka"]["group_id"], list(ends)
    )
    assert all(committed[k] <= at_crash.get(k, 0) for k in ends), (committed, at_crash)

    # The restart resumes the interrupted retrain; a smaller budget lets it finish.
    resumed_config = deep_merge(config, _search(trials=8, timeout_s=None))
    with ServiceProcess(resumed_config, tmp_path, name="resumed") as resumed:
        wait_checkpointed(resumed_config, ends, resumed)
        resumed.wait_metric(COMPLETE, 8, timeout=120)
        resumed.wait_metric(ASSIGNED, 1, timeout=60)
        assert resumed.stop() == 0, resumed.tail()

    loaded = load_final(resumed_config)
    verdict = judge([loaded.state], ends)
    final_committed = committed_offsets(
        kafka_broker.bootstrap_servers, config["kafka"]["group_id"], list(ends)
    )
    registry = ModelRegistry(
        Path(config["registry"]["root"]), config["model"]["name"], HMAC_KEY.encode(), keep_last=100
    )
    searched = [v for v in registry.list() if v.metadata.get("search")]
    print(
        f"\n[kill during search] checkpoint at crash {at_crash}, committed {committed}; "
        f"{verdict.line()}; broker's committed offsets after the restart {final_committed}; "
        f"versions with a search: {len(searched)}"
    )
    assert verdict.lost == 0, verdict.holes
    assert verdict.twice == 0
    assert loaded.state.records_learnt == RECORDS
    assert final_committed == ends  # the broker's own record, not the service's ledger
    assert searched, "the resumed retrain must search and publish its winner"
