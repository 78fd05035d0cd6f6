"""JSON log lines, bound context, redaction, librdkafka logger."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from stream_trainer.operations import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.configure_logging("DEBUG", "json", stream=out)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)
    logs.clear_secrets()
    logs.clear_context()


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_shape(stream: io.StringIO) -> None:
    logging.getLogger("stream_trainer.test").info(
        "checkpoint %s written", 7, extra={"size_bytes": 12}
    )
    [line] = lines(stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert line["level"] == "info"
    assert line["logger"] == "stream_trainer.test"
    assert line["event"] == "checkpoint 7 written"
    assert line["size_bytes"] == 12


def test_level_filters(stream: io.StringIO) -> None:
    logs.configure_logging("WARNING", "json", stream=stream)
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    assert [line["event"] for line in lines(stream)] == ["shown"]
    assert len(logging.getLogger().handlers) >= 1
    # idempotent: a second call replaced the first handler, no duplicates
    assert (
        sum(1 for h in logging.getLogger().handlers if getattr(h, "_stream_trainer_handler", False))
        == 1
    )


def test_bound_context(stream: io.StringIO) -> None:
    log = logging.getLogger("t")
    logs.bind(model_version=3)
    with logs.bind(partition=1):
        log.info("inside")
        assert logs.current_context() == {"model_version": 3, "partition": 1}
    log.info("outside", extra={"model_version": 4})
    inside, outside = lines(stream)
    assert (inside["partition"], inside["model_version"]) == (1, 3)
    assert "partition" not in outside
    assert outside["model_version"] == 4  # extra wins over bound context


def test_context_is_per_thread(stream: io.StringIO) -> None:
    logs.bind(partition=9)
    thread = threading.Thread(target=lambda: logging.getLogger("t").info("other thread"))
    thread.start()
    thread.join()
    assert "partition" not in lines(stream)[0]


def test_redaction_of_keys_and_registered_secrets(stream: io.StringIO) -> None:
    logs.register_secret("hunter2-very-secret")
    logs.register_secret("ab")  # too short to mask safely: ignored
    log = logging.getLogger("t")
    with logs.bind(api_token="tok-123"):
        log.info(
            "connecting with %s",
            "hunter2-very-secret",
            extra={
                "sasl_password": "pw",
                "config": {"ssl.key.password": "x", "bootstrap": "b:9092"},
                "note": "key is hunter2-very-secret",
            },
        )
    [line] = lines(stream)
    text = json.dumps(line)
    assert "hunter2" not in text and "tok-123" not in text and '"pw"' not in text
    assert line["event"] == "connecting with ***"
    assert line["api_token"] == logs.MASK
    assert line["sasl_password"] == logs.MASK
    assert line["config"] == {"ssl.key.password": "***", "bootstrap": "b:9092"}
    assert line["note"] == "key is ***"
    assert "ab" in logs.redact_text("ab")


def test_exception_is_one_field(stream: io.StringIO) -> None:
    logs.register_secret("s3cr3t-value")
    try:
        raise ValueError("bad s3cr3t-value")
    except ValueError:
        logging.getLogger("t").exception("failed")
    [line] = lines(stream)
    assert line["exc_type"] == "ValueError"
    assert "Traceback" in line["exc"] and "ValueError: bad ***" in line["exc"]
    assert "s3cr3t-value" not in stream.getvalue()
    assert len(stream.getvalue().splitlines()) == 1


def test_text_format() -> None:
    out = io.StringIO()
    handler = logs.configure_logging("INFO", "text", stream=out)
    try:
        with logs.bind(partition=2):
            logging.getLogger("t").info("hello")
    finally:
        logging.getLogger().removeHandler(handler)
    assert re.fullmatch(r"\S+Z INFO    t hello partition=2\n", out.getvalue())
    with pytest.raises(ValueError, match="format"):
        logs.configure_logging("INFO", "xml", stream=out)  # type: ignore[arg-type]


def test_librdkafka_logger_fields(stream: io.StringIO) -> None:
    logger = logs.librdkafka_logger()
    assert logger is logs.librdkafka_logger()
    assert len(logger.filters) == 1
    # confluent_kafka calls logger.log(level, "%s [%s] %s", fac, name, message)
    logger.log(logging.WARNING, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "broker down")
    [line] = lines(stream)
    assert line["event"] == "broker down"
    assert line["facility"] == "FAIL"
    assert line["client"] == "rdkafka#consumer-1"
    assert line["logger"] == "stream_trainer.librdkafka"
    assert line["level"] == "warning"


# --- repeats ---------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited() -> Iterator[tuple[io.StringIO, _Clock]]:
    out = io.StringIO()
    clock = _Clock()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RepeatFilter(10.0, clock=clock))
    handler.addFilter(logs.RedactionFilter())
    logger = logging.getLogger("stream_trainer.test.repeats")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield out, clock
    logger.removeHandler(handler)
    logger.propagate = True


def test_repeated_warning_shown_once_per_interval_with_its_count(
    limited: tuple[io.StringIO, _Clock],
) -> None:
    out, clock = limited
    log = logging.getLogger("stream_trainer.test.repeats")
    for i in range(200):  # 20 a second for 10 s, as during a broker outage
        clock.now = 100.0 + i * 0.05
        log.error("Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after %dms)", i % 3)
    clock.now = 110.0
    log.error("Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 7ms)")
    clock.now = 111.0
    log.error("Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 1ms)")
    shown = lines(out)
    assert [line.get("repeated") for line in shown] == [None, 199]
    assert shown[0]["event"].endswith("(after 0ms)")


def test_repeats_keep_lines_about_different_things_apart(
    limited: tuple[io.StringIO, _Clock],
) -> None:
    out, _clock = limited
    log = logging.getLogger("stream_trainer.test.repeats")
    for _ in range(3):
        log.error("partition halted", extra={"partition": "t:0", "reason": "ratio 0.9"})
        log.error("partition halted", extra={"partition": "t:1", "reason": "ratio 0.95"})
        log.warning("kafka error", extra={"code": "_TRANSPORT", "reason": "after 3ms"})
        log.warning("kafka error", extra={"code": "_TRANSPORT", "reason": "after 4ms"})
        log.warning("kafka error", extra={"code": "_ALL_BROKERS_DOWN", "reason": "1/1 down"})
        log.warning("Connect to 10.0.0.1:9092 failed")
        log.warning("Connect to 10.0.0.2:9092 failed")
        log.info("info lines are never held back")
    events = [(line["event"], line.get("partition"), line.get("code")) for line in lines(out)]
    assert events.count(("partition halted", "t:0", None)) == 1
    assert events.count(("partition halted", "t:1", None)) == 1
    assert events.count(("kafka error", None, "_TRANSPORT")) == 1
    assert events.count(("kafka error", None, "_ALL_BROKERS_DOWN")) == 1
    assert events.count(("Connect to 10.0.0.1:9092 failed", None, None)) == 1
    assert events.count(("Connect to 10.0.0.2:9092 failed", None, None)) == 1
    assert events.count(("info lines are never held back", None, None)) == 3


def test_configure_logging_limits_repeats_unless_turned_off() -> None:
    root = logging.getLogger()
    level = root.level
    for interval, expected in ((logs.REPEAT_INTERVAL_S, 1), (0.0, 5)):
        out = io.StringIO()
        handler = logs.configure_logging("INFO", "json", stream=out, repeat_interval_s=interval)
        try:
            for _ in range(5):
                logging.getLogger("stream_trainer.test").warning("broker down")
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
        assert len(lines(out)) == expected
