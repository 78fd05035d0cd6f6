"""SIGTERM during a long full retrain: exit 0 within the bound in both fit modes, and the
abandoned retrain runs again after the restart, under the same trigger.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerHandle
from tests.faults.support import (
    LEARNT,
    fault_config,
    load_final,
    produce_records,
    wait_exit,
)
from tests.harness import ServiceProcess

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RETRAINING = 'stream_trainer_state{stream_trainer_state="retraining"}'
WINDOW = 15_000
BOUND_S = 5.0
# A stop must end within the bound; this much more covers the interpreter's own exit.
MARGIN_S = 2.0


def _config(tmp_path: Path, broker: BrokerHandle, fit_in_worker: bool) -> dict[str, Any]:
    """A retrain that takes far longer than the shutdown bound (~15-40 s on 2 cores)."""
    return fault_config(
        tmp_path,
        broker,
        1,
        {
            "model": {
                "preprocessing": [],
                "learner": {
                    "path": "sklearn.ensemble.RandomForestClassifier",
                    "params": {"n_estimators": 200, "random_state": 0},
                },
            },
            "training": {
                "mode": "full_batch",
                "full_batch": {
                    "window_records": WINDOW,
                    "retrain_every_records": WINDOW,
                    "retrain_on_drift": False,
                    "fit_in_worker": fit_in_worker,
                },
            },
            "drift": {"enabled": False},
            "shutdown": {"timeout_s": BOUND_S},
        },
    )


def _retrain_events(service: ServiceProcess, event: str) -> list[dict[str, Any]]:
    found = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == event:
            found.append(entry)
    return found


def _stop_during_retrain(service: ServiceProcess) -> tuple[int, float]:
    """SIGTERM once a retrain runs; (exit code, seconds from the signal to the exit)."""
    service.wait_metric(RETRAINING, 1, timeout=120)
    assert service.proc is not None
    signalled = time.monotonic()
    service.proc.terminate()
    code = wait_exit(service, BOUND_S + 30, "SIGTERM during a retrain")
    return code, time.monotonic() - signalled


@pytest.mark.parametrize("fit_in_worker", [False, True], ids=["thread", "worker"])
def test_sigterm_during_a_long_fit_exits_0_within_the_bound(
    fit_in_worker: bool, kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    config = _config(tmp_path, kafka_broker, fit_in_worker)
    produce_records(config, WINDOW, 1)
    service = ServiceProcess(config, tmp_path, name="first").start()
    try:
        code, took = _stop_during_retrain(service)
    finally:
        service.__exit__()
    mode = "worker" if fit_in_worker else "thread"
    print(f"\n[stop during a fit, {mode}] exit {code} after {took:.2f} s (bound {BOUND_S} s)")
    assert code == 0, service.tail()
    assert took <= BOUND_S + MARGIN_S
    assert not _retrain_events(service, "full retrain finished"), "the fit was not long enough"
    state = load_final(config).state
    assert state.records_learnt == WINDOW  # the stop checkpointed everything it learnt


def test_retrain_abandoned_by_a_stop_runs_after_the_restart(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    config = _config(tmp_path, kafka_broker, fit_in_worker=True)
    produce_records(config, WINDOW, 1)
    first = ServiceProcess(config, tmp_path, name="first").start()
    try:
        code, took = _stop_during_retrain(first)
    finally:
        first.__exit__()
    assert code == 0, first.tail()
    started = _retrain_events(first, "full retrain started")
    assert [e["trigger"] for e in started] == ["count"]

    second = ServiceProcess(config, tmp_path, name="second").start()
    try:
        began = time.monotonic()
        second.wait_metric('stream_trainer_retrains_total{trigger="count"}', 1, timeout=180)
        rerun_s = time.monotonic() - began
        assert second.metric(LEARNT) == 0  # no new record: the restored trigger ran it
        assert second.stop() == 0, second.tail()
    finally:
        second.__exit__()
    finished = _retrain_events(second, "full retrain finished")
    state = load_final(config).state
    print(
        f"\n[retrain abandoned by a stop] stopped in {took:.2f} s; after the restart the "
        f"'count' retrain ran again and finished in {rerun_s:.1f} s "
        f"(accepted {finished[0]['accepted'] if finished else None}); retrains {state.retrains}"
    )
    assert [e["trigger"] for e in finished] == ["count"]
    assert state.retrain_running is None
    assert state.retrains == 1
    assert state.model.is_fitted()
