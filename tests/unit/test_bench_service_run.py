"""The bench's RSS growth: where warm-up ends, so a one-off step is not reported as growth."""

from __future__ import annotations

import math

from stream_trainer.laptop.benchmarks.service_run import Sample, ServiceRun

MB = 1 << 20


def run(*samples: tuple[float, float, bool]) -> ServiceRun:
    service = ServiceRun(total=1000, started=0.0)
    for t, (learnt, rss_mb, retraining) in enumerate(samples):
        service.samples.append(Sample(float(t), learnt, rss_mb * MB, retraining))
    return service


def test_without_retrains_warm_up_ends_at_the_fraction_of_records() -> None:
    rss = run((0, 100, False), (50, 150, False), (120, 200, False), (1000, 210, False)).rss()
    assert rss["warm_learnt"] == 120
    assert math.isclose(rss["growth_pct"], 5.0)


def test_warm_up_ends_after_the_first_retrain_finished() -> None:
    rss = run(
        (120, 200, False),
        (300, 230, True),  # the first fit allocates its working set
        (400, 240, True),
        (500, 240, False),
        (700, 250, True),
        (1000, 252, False),
    ).rss()
    assert rss["warm_learnt"] == 500
    assert math.isclose(rss["growth_pct"], 5.0)


def test_a_leak_after_warm_up_is_still_reported() -> None:
    rss = run((120, 200, False), (300, 200, True), (500, 200, False), (1000, 300, False)).rss()
    assert math.isclose(rss["growth_pct"], 50.0)


def test_a_run_whose_first_retrain_never_finished_reports_no_growth() -> None:
    rss = run((120, 200, False), (300, 230, True), (1000, 260, True)).rss()
    assert math.isnan(rss["growth_pct"]) and math.isnan(rss["warm_learnt"])


def test_full_batch_compares_only_periods_with_a_model() -> None:
    # 0-300: no model yet (fast); 300-400: the first retrain; then with a model, 100/s whether
    # a retrain runs or not.
    service = ServiceRun(total=10_000, started=0.0)
    timeline = [
        (0, 1, False),
        (1, 301, False),
        (2, 401, True),
        (3, 501, False),
        (4, 601, False),
        (5, 701, True),
        (6, 801, True),
        (7, 901, False),
    ]
    for t, learnt, retraining in timeline:
        service.samples.append(Sample(float(t), float(learnt), math.nan, retraining))
    figures = service.full_batch()
    assert figures["rate_before_first_model"] == 300
    assert figures["rate_during_retrain"] == 100
    assert figures["rate_without_retrain"] == 100
    assert figures["ratio"] == 1.0


def test_learn_loop_rate_and_its_share_recompose_the_service_rate() -> None:
    # 2000 records at 100/s (20 s of wall time), 16 s of them in predict + learn calls.
    service = ServiceRun(total=2000, started=0.0)
    service.samples = [Sample(0.0, 500.0, math.nan, False), Sample(10.0, 1500.0, math.nan, False)]
    service.final = {
        "stream_trainer_records_learnt_total": 2000.0,
        "stream_trainer_learn_duration_seconds_sum": 12.0,
        "stream_trainer_predict_duration_seconds_sum": 4.0,
    }
    loop = service.learn_loop_rate()
    assert math.isclose(loop, 125.0)
    shares = service.time_shares()
    # service / ceiling = (loop / ceiling) x (the loop's share of wall time), for any ceiling.
    ceiling = 200.0
    assert math.isclose(
        service.rate() / ceiling, loop / ceiling * (shares["learn"] + shares["predict"])
    )


def test_learn_loop_rate_is_unknown_without_the_histograms() -> None:
    assert math.isnan(ServiceRun(total=10, started=0.0).learn_loop_rate())
