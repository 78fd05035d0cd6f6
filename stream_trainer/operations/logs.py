"""Structured logging: JSON lines on stdout, bound context, secrets redacted.

One line per record::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "logger":
    "stream_trainer.operations.service",
     "event": "checkpoint written", "partition": 3, "model_version": 7, "size_bytes": 1234}

Context bound with :func:`bind` (a contextvar, so it follows the current thread /
task; new threads start empty) and ``extra=`` fields become top-level keys.
Values of keys that look secret (password, secret, key, token) and every string
registered with :func:`register_secret` are masked, in the message, fields and
tracebacks alike. A warning or error that repeats (a broker outage makes librdkafka and
the consumer say the same thing many times a second) is shown once, then at most once per
``REPEAT_INTERVAL_S`` with ``repeated``: how many were held back since the last shown.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO, Any, Literal

MASK = "***"
SECRET_KEY_PARTS: tuple[str, ...] = ("password", "secret", "key", "token")
# Shorter registered values would mask unrelated text everywhere.
MIN_SECRET_LENGTH = 4
LIBRDKAFKA_LOGGER = "stream_trainer.librdkafka"
_CHATTY_LIBRARIES = ("httpx", "httpx2", "httpcore", "httpcore2")
REPEAT_INTERVAL_S = 10.0
# Distinct repeat keys remembered; past that the oldest are forgotten (memory stays bounded).
MAX_REPEAT_KEYS = 1024
# Numbers that vary between otherwise identical lines ("after 3ms", "4 identical error(s)"),
# not parts of an address (127.0.0.1:9092) or a name (consumer-2).
_VOLATILE_NUMBER = re.compile(r"(?<![\w.:#/-])\d+(?:\.\d+)?(?![\d.:])")

_context: ContextVar[dict[str, Any] | None] = ContextVar("stream_trainer_log_context", default=None)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName", "_st_context"}
)
_HANDLER_MARK = "_stream_trainer_handler"


# --- bound context ---------------------------------------------------------------------


class Binding:
    """Returned by :func:`bind`; as a context manager, restores the previous context."""

    def __init__(self, token: Token[dict[str, Any] | None]) -> None:
        self._token = token

    def __enter__(self) -> Binding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unbind()

    def unbind(self) -> None:
        """Restore the context as it was before this binding."""
        _context.reset(self._token)


def bind(**context: Any) -> Binding:
    """Add fields to every log line of the current context (thread / task).

    ``bind(model_version=3)`` keeps them; ``with bind(partition=1): ...`` removes
    them on exit.
    """
    merged = {**(_context.get() or {}), **context}
    return Binding(_context.set(merged))


def current_context() -> dict[str, Any]:
    """A copy of the fields bound in the current context."""
    return dict(_context.get() or {})


def clear_context() -> None:
    """Drop every bound field of the current context."""
    _context.set(None)


# --- redaction -------------------------------------------------------------------------


def register_secret(value: str | bytes | None) -> None:
    """Mask ``value`` wherever it appears in a log line (values under 4 chars ignored)."""
    if value is None:
        return
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if len(text) >= MIN_SECRET_LENGTH:
        with _secrets_lock:
            _secrets.add(text)


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    with _secrets_lock:
        _secrets.clear()


def is_secret_key(key: str) -> bool:
    """True for field names whose values are never logged."""
    lowered = key.lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)


def redact_text(text: str) -> str:
    """``text`` with every registered secret replaced by the mask."""
    with _secrets_lock:
        # Longest first, so a secret containing another is masked whole.
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(value: Any) -> Any:
    """Redact strings and the values of secret-looking keys, recursively."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and is_secret_key(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    return value


class RedactionFilter(logging.Filter):
    """Renders the message, captures bound context and redacts everything on the record.

    Attach to a handler: runs in the emitting thread, so the contextvar is the caller's.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key in _RECORD_ATTRS:
                continue
            setattr(record, key, MASK if is_secret_key(key) else redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        record._st_context = redact(current_context())
        return True


# --- repeats -------------------------------------------------------------------------


class RepeatFilter(logging.Filter):
    """Lets the first of a repeated warning or error through, then at most one per
    ``interval_s``, carrying ``repeated``: the lines held back since the previous one.

    Lines repeat when logger, level, message (volatile numbers aside) and fields are the
    same; only a field named ``reason`` is compared with its numbers aside too, so lines
    about different partitions or error codes are never merged. Attach to a handler, before
    :class:`RedactionFilter`. Thread-safe. Held-back lines are reported by the next one shown.
    """

    def __init__(
        self,
        interval_s: float = REPEAT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        min_level: int = logging.WARNING,
    ) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._min_level = min_level
        self._lock = threading.Lock()
        # key -> [monotonic time the last line was shown, lines held back since]
        self._seen: dict[Hashable, list[float]] = {}

    @staticmethod
    def _key(record: logging.LogRecord) -> Hashable:
        fields = []
        for key, value in sorted(vars(record).items()):
            if key in _RECORD_ATTRS:
                continue
            text = repr(value)
            fields.append((key, _VOLATILE_NUMBER.sub("#", text) if key == "reason" else text))
        message = _VOLATILE_NUMBER.sub("#", record.getMessage())
        return (record.name, record.levelno, message, tuple(fields))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self._min_level:
            return True
        key = self._key(record)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= MAX_REPEAT_KEYS:
                    del self._seen[next(iter(self._seen))]
                self._seen[key] = [now, 0]
                return True
            if now - seen[0] < self._interval_s:
                seen[1] += 1
                return False
            held_back = int(seen[1])
            seen[0], seen[1] = now, 0
        if held_back:
            record.repeated = held_back
        return True


# --- formatting ------------------------------------------------------------------------


def _timestamp(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Bound context, then ``extra=`` fields (extras win on a clash)."""
    fields: dict[str, Any] = dict(getattr(record, "_st_context", None) or {})
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS:
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)  # the four core keys cannot be overwritten
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
            if record.exc_info and record.exc_info[0] is not None:
                line["exc_type"] = record.exc_info[0].__name__
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable: ``ts level logger event key=value ...`` (+ traceback lines)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record.created), f"{record.levelname:<7}", record.name]
        parts.append(record.getMessage())
        parts += [f"{k}={v!r}" for k, v in _fields(record).items()]
        text = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def configure_logging(
    level: str = "INFO",
    fmt: Literal["json", "text"] = "json",
    stream: IO[str] | None = None,
    repeat_interval_s: float = REPEAT_INTERVAL_S,
) -> logging.Handler:
    """Route every logger (root) to ``stream`` (default stdout) in ``fmt``; idempotent.

    Repeated warnings and errors are rate-limited (see :class:`RepeatFilter`; 0 turns it
    off). Replaces the handler a previous call installed, leaves others alone. Returns
    the installed handler.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if repeat_interval_s > 0:
        handler.addFilter(RepeatFilter(repeat_interval_s))
    handler.addFilter(RedactionFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The schema registry client's HTTP library logs every request at INFO: one line per
    # schema lookup, and one per retry through a registry outage (the service logs those).
    for chatty in _CHATTY_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    return handler


# --- librdkafka --------------------------------------------------------------------------


class _LibrdkafkaFilter(logging.Filter):
    """Turns confluent_kafka's ``log(level, "%s [%s] %s", fac, name, text)`` into fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 3 and all(isinstance(a, str) for a in args):
            facility, client, text = args
            record.msg, record.args = text, None
            record.facility = facility
            record.client = client
        return True


def librdkafka_logger() -> logging.Logger:
    """The logger to pass as confluent_kafka's ``logger=`` config value.

    librdkafka lines then share the JSON formatter, with ``facility`` and
    ``client`` as fields. (confluent_kafka serves these logs from ``poll()``.)
    """
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    if not any(isinstance(f, _LibrdkafkaFilter) for f in logger.filters):
        logger.addFilter(_LibrdkafkaFilter())
    return logger
