"""Attribution of py-spy's raw stacks to the poll loop's stages (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_trainer.laptop.benchmarks import profiling
from stream_trainer.laptop.benchmarks.profiling import attribute_raw, summarize

SITE = "/venv/lib/python3.11/site-packages"
SRC = "/src/stream_trainer"
LOOP = (
    f"thread (7): MainThread;<module> ({SRC}/__main__.py:1);"
    f"Service.run ({SRC}/service.py:171);Service.step ({SRC}/service.py:180)"
)
RAW = "\n".join(
    [
        # River under the trainer: the learner library, whatever it calls.
        f"{LOOP};Service._advance ({SRC}/service.py:236);Service._process ({SRC}/service.py:262)"
        f";PerRecordTrainer.learn ({SRC}/trainers.py:96);RiverAdapter.learn_one "
        f"({SRC}/learners.py:443);Pipeline.learn_one ({SITE}/river/compose/pipeline.py:400)"
        f";dot ({SITE}/river/utils/math.py:20) 80",
        # The trainer's own loop and the dicts it builds: the service's cost, by function.
        f"{LOOP};Service._advance ({SRC}/service.py:236);Service._process ({SRC}/service.py:262)"
        f";PerRecordTrainer.learn ({SRC}/trainers.py:96) 5",
        f"{LOOP};Service._advance ({SRC}/service.py:236);Service._process ({SRC}/service.py:262)"
        f";PerRecordTrainer.learn ({SRC}/trainers.py:96);DecodedBatch.x_dicts "
        f"({SRC}/records.py:142) 4",
        # A third-party call below service code is charged to the service function.
        f"{LOOP};KafkaSource.consume ({SRC}/consumer.py:90);inner ({SITE}/other/mod.py:3) 3",
        # The model adapter is the learner's too: the learner ceiling times it.
        f"{LOOP};Service._advance ({SRC}/service.py:236);RiverAdapter.learn_one "
        f"({SRC}/learners.py:443) 1",
        f"{LOOP};Service._report_unit ({SRC}/service.py:332);Counter.inc "
        f"({SITE}/prometheus_client/metrics.py:300) 2",
        f"{LOOP};Service._start_checkpoint ({SRC}/service.py:426);_snapshot "
        f"({SITE}/sklearn/base.py:10) 6",
        # Start-up, and other threads, are not the loop's.
        f"thread (7): MainThread;<module> ({SRC}/__main__.py:1);build ({SRC}/app.py:40) 50",
        f"thread (9): http;serve ({SRC}/http.py:100) 70",
        "a malformed line",
    ]
)


def test_samples_are_charged_to_the_learner_library_or_the_innermost_service_function() -> None:
    counts = attribute_raw(RAW)
    assert counts == {
        "river (learner library)": 80,
        "trainers.PerRecordTrainer.learn": 5,
        "records.DecodedBatch.x_dicts": 4,
        "consumer.KafkaSource.consume": 3,
        "service.Service._report_unit": 2,
        "learners.RiverAdapter.learn_one": 1,
        "sklearn (learner library)": 6,
        profiling.OUTSIDE_LOOP: 50,
    }


def test_summary_shares_are_of_the_loop_and_keep_the_rest_summed() -> None:
    first = attribute_raw(RAW)
    second = attribute_raw(RAW.replace(" 80\n", " 20\n"))
    summary = summarize([first, second], top=3)
    loop = (80 + 5 + 4 + 3 + 2 + 1 + 6) + (20 + 5 + 4 + 3 + 2 + 1 + 6)
    assert summary["loop_samples"] == loop
    assert summary["outside_loop_samples"] == 100
    assert summary["learner_share"] == pytest.approx((100 + 2 + 12) / loop)
    assert summary["per_run_learner_share"] == pytest.approx([87 / 101, 27 / 41])
    assert list(summary["shares"]) == [
        "river (learner library)",
        "sklearn (learner library)",
        "trainers.PerRecordTrainer.learn",
        "(everything else)",
    ]
    assert sum(summary["shares"].values()) == pytest.approx(1.0)


def test_an_empty_profile_summarizes_to_no_shares() -> None:
    summary = summarize([attribute_raw("")])
    assert summary["loop_samples"] == 0
    assert summary["shares"] == {}
    assert summary["learner_share"] == 0.0


def test_a_missing_py_spy_is_named_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    with pytest.raises(profiling.ProfilerError, match=r"stream-trainer\[profile\]"):
        profiling.py_spy_executable()
