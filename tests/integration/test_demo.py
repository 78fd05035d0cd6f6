"""``stream-trainer demo`` end to end: embedded broker, the real service, a real dataset.

Each test runs the demo as a subprocess, exactly as a user would, and checks what it
reports against the stream it produced, its learning-curve image, and that every process
it started (broker, service) is gone afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest

from tests.harness import ROOT, wait_for

pytestmark = pytest.mark.integration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The demo signs nothing unless a key is set; keep the test independent of the caller.
    env.pop("STREAM_TRAINER_CHECKPOINT__HMAC_KEY", None)
    env.pop("STREAM_TRAINER_CONFIG", None)
    return env


def _children(pid: int) -> set[int]:
    """Pids of the live processes whose parent is ``pid`` (from /proc)."""
    out: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # exited, waiting for init to reap it


def _assert_all_gone(pids: set[int]) -> None:
    wait_for(
        lambda: all(_gone(pid) for pid in pids),
        15.0,
        f"processes started by the demo to exit: {sorted(pids)}",
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["per_record", "mini_batch", "full_batch"])
def test_demo_runs_each_mode_end_to_end(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_trainer",
            "demo",
            "--records",
            "600",
            "--mode",
            mode,
            "--output-dir",
            str(out),
            "--bad-records",
            "0.05",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == mode
    assert summary["completed"] is True
    assert summary["records_produced"] == 600
    assert summary["records_invalid"] > 0  # 5 % of 600: the dead-letter path is exercised
    assert summary["records_learnt"] + summary["records_dead_lettered"] == 600
    assert summary["records_dead_lettered"] == summary["records_invalid"]
    assert summary["records_learnt"] == summary["records_valid"]
    assert summary["dead_letters_by_reason"] == summary["invalid_reasons_produced"]
    assert summary["service_exit_code"] == 0
    assert summary["checkpoints"] >= 1
    assert summary["checkpoints"] == len(list((out / "checkpoints").glob("ckpt-*.ckpt")))
    assert 0.0 <= summary["metrics_total"]["accuracy"] <= 1.0
    assert summary["curve_points"] >= 3  # paced producing gives the curve several points
    # A published version is on disk with its metadata.
    assert summary["versions_published"] >= 1
    assert list((out / "registry" / "phishing" / "versions").glob("*/metadata.json"))

    curve = Path(summary["learning_curve"])
    assert curve == out / "learning-curve.png"
    data = curve.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert 5_000 < len(data) < 2_000_000
    assert str(curve) in result.stdout  # the path is printed
    assert "summary" in result.stdout and "records dead-lettered" in result.stdout

    pids = summary["pids"]
    assert set(pids) == {"demo", "broker", "service"}
    _assert_all_gone({pids["broker"], pids["service"]})


def _read_lines(stream: Any, queue: Queue[str]) -> None:
    for line in stream:
        queue.put(line)


@pytest.mark.timeout(120)
def test_ctrl_c_stops_everything_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_trainer",
            "demo",
            "--records",
            "200000",
            "--output-dir",
            str(out),
            "--rate",
            "2000",
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: Queue[str] = Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60.0
        while not any(line.startswith("progress:") and "learnt 0/" not in line for line in seen):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no training progress within 60 s:\n" + "".join(seen)
            try:
                seen.append(lines.get(timeout=remaining))
            except Empty:
                continue
        children = _children(proc.pid)
        started = json.loads((out / "pids.json").read_text())
        assert {started["broker"], started["service"]} <= children

        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)  # EOF once the demo (and anything holding its stdout) exited
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 130, "".join(seen)
    _assert_all_gone(children)
    # The interrupted run did not pretend to have finished.
    assert not (out / "summary.json").exists()


@pytest.mark.timeout(180)
def test_demo_runs_a_small_search_and_reports_what_it_found(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    trials = 6
    result = subprocess.run(
        [
            *(sys.executable, "-m", "stream_trainer", "demo", "--records", "2000"),
            *("--mode", "full_batch", "--search", str(trials), "--output-dir", str(out)),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["retrains"] >= 1
    searches = summary["searches"]
    assert searches, "a retrain with --search must publish a searched version"
    first = searches[0]
    assert first["trials"] == trials
    assert first["counts"]["complete"] == trials
    assert set(first["best_params"]) == {"learner.max_depth", "learner.min_samples_leaf"}
    # The best trial is never worse than the configured params on the same split.
    assert first["best_score"] >= first["baseline_score"]
    assert f"search behind v{first['version']}" in result.stdout


def test_demo_search_outside_full_batch_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "stream_trainer", "demo", "--mode", "per_record"),
            *("--search", "5", "--output-dir", str(tmp_path / "demo")),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--search needs --mode full_batch" in result.stderr
