"""Confluent wire format: Avro and JSON Schema values whose schemas live in a Schema Registry.

A framed value is ``0x00`` (magic byte) + the schema id (4 bytes, big-endian) + the payload
(Avro binary without a header, or UTF-8 JSON). :class:`WireDecoder` splits the work in two
so that no network call ever happens per record:

1. :meth:`WireDecoder.ensure` fetches the schemas of a unit's ids (:func:`schema_ids`)
   through confluent-kafka's ``SchemaRegistryClient``; while the registry is unreachable,
   slow or answers 5xx/429 it waits and retries (capped exponential backoff, ``on_retry``
   called each time), because a dependency that blinks must never cost good records. It
   returns once every id is cached or known absent (the registry answered 404 for it).
2. :meth:`WireDecoder.decode` is pure: it decodes one value against the cached schema and
   raises :class:`WireFormatError` (with a low-cardinality ``reason``) for anything wrong
   with the value, and nothing else.

A decoder pickles into a decode-only copy (parsed schemas, no client, no credentials), for
a decode worker process. No I/O at import time or in the constructor.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Self

import fastavro
import jsonschema_rs
import msgspec

from stream_trainer.errors import StreamTrainerError

if TYPE_CHECKING:
    from stream_trainer.config import SchemaRegistrySettings

__all__ = [
    "BAD_FRAME",
    "HEADER_SIZE",
    "JSON_SCHEMA_INVALID",
    "MAGIC_BYTE",
    "MALFORMED_AVRO",
    "MALFORMED_JSON",
    "REASONS",
    "UNKNOWN_SCHEMA",
    "UNSUPPORTED_SCHEMA",
    "RegistryWaitInterrupted",
    "SchemaNotEnsured",
    "SchemaRegistryUnavailable",
    "WireDecoder",
    "WireFormatError",
    "frame",
    "schema_ids",
]

MAGIC_BYTE: Final = 0
HEADER_SIZE: Final = 5

# WireFormatError.reason values: low-cardinality, safe as a metric label.
BAD_FRAME: Final = "bad_frame"
UNKNOWN_SCHEMA: Final = "unknown_schema"
UNSUPPORTED_SCHEMA: Final = "unsupported_schema"
MALFORMED_AVRO: Final = "malformed_avro"
MALFORMED_JSON: Final = "malformed_json_schema"
JSON_SCHEMA_INVALID: Final = "json_schema_invalid"
REASONS: Final = (
    BAD_FRAME,
    UNKNOWN_SCHEMA,
    UNSUPPORTED_SCHEMA,
    MALFORMED_AVRO,
    MALFORMED_JSON,
    JSON_SCHEMA_INVALID,
)

_MAX_DETAIL = 200  # an error message quotes at most this much of a library's message
_SR_SCHEMA_NOT_FOUND = 40403  # Confluent's (and Apicurio's ccompat) "schema not found" code


class WireFormatError(StreamTrainerError, ValueError):
    """A value that cannot be decoded: dead-letter it.

    ``reason`` is one of :data:`REASONS` (a metric label); ``message`` says what is wrong
    for a human (names the schema id when there is one); ``schema_id`` is None for a bad
    frame.
    """

    def __init__(self, reason: str, message: str, schema_id: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.schema_id = schema_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.message, self.schema_id))


class SchemaRegistryUnavailable(StreamTrainerError):
    """The registry could not answer for a schema id (unreachable, timed out, 5xx, 429, or
    an answer that is not a schema); passed to ``on_retry``, never raised by ``ensure``."""


class RegistryWaitInterrupted(StreamTrainerError):
    """:meth:`WireDecoder.ensure` was asked to stop while waiting for the registry."""


class SchemaNotEnsured(StreamTrainerError, LookupError):
    """``decode`` met a schema id that ``ensure`` never saw: a caller bug, not bad data
    (so it is not a :class:`WireFormatError` and must not dead-letter the record)."""


def frame(schema_id: int, payload: bytes) -> bytes:
    """``payload`` in the Confluent wire format under ``schema_id`` (0 ... 2**32-1)."""
    return bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big") + payload


def _frame_id(value: object) -> int | None:
    if not isinstance(value, bytes | bytearray) or len(value) < HEADER_SIZE:
        return None
    if value[0] != MAGIC_BYTE:
        return None
    return int.from_bytes(value[1:HEADER_SIZE], "big")


def schema_ids(values: Iterable[bytes | None]) -> set[int]:
    """The schema ids framed in ``values``; values without a valid frame are ignored
    (``decode`` rejects them later)."""
    found: set[int] = set()
    for value in values:
        schema_id = _frame_id(value)
        if schema_id is not None:
            found.add(schema_id)
    return found


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


@dataclass(frozen=True)
class _Raw:
    """What the registry said about one id: enough to rebuild the parsed form offline."""

    schema_type: str  # AVRO, JSON, PROTOBUF, ...
    schema_str: str
    has_references: bool


@dataclass(frozen=True)
class _Compiled:
    kind: str  # "avro" | "json" | "unsupported"
    parsed: Any  # fastavro parsed schema | jsonschema_rs validator | reason text


def _compile(raw: _Raw) -> _Compiled:
    """Parse a schema once (no network). A schema this decoder cannot use becomes an
    ``unsupported`` entry: its records are dead-lettered with the reason, not retried."""
    schema_type = (raw.schema_type or "AVRO").upper()
    if raw.has_references:
        return _Compiled("unsupported", "uses schema references (not supported yet)")
    try:
        if schema_type == "AVRO":
            return _Compiled("avro", fastavro.parse_schema(json.loads(raw.schema_str)))
        if schema_type == "JSON":
            document = json.loads(raw.schema_str)
            # offline: a $ref to a remote document fails here instead of fetching it (decode
            # stays free of network calls); without $schema, draft 7 as Confluent assumes.
            if isinstance(document, dict) and "$schema" in document:
                return _Compiled("json", jsonschema_rs.validator_for(document, offline=True))
            return _Compiled("json", jsonschema_rs.Draft7Validator(document, offline=True))
    except Exception as exc:
        return _Compiled("unsupported", f"{schema_type} schema does not parse: {_short(exc)}")
    return _Compiled("unsupported", f"schema type {schema_type} is not supported")


Callback = Callable[[SchemaRegistryUnavailable], None]


class WireDecoder:
    """Decodes Confluent wire-format values; schemas fetched by :meth:`ensure`, cached by id.

    ``settings`` gives the registry URL, credentials, timeout and backoff; ``client`` (a
    ``SchemaRegistryClient``) overrides the one built from them. Not thread-safe: one
    thread calls ``ensure`` and ``decode``.
    """

    def __init__(
        self, settings: SchemaRegistrySettings | None = None, *, client: Any = None
    ) -> None:
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._raw: dict[int, _Raw] = {}
        self._compiled: dict[int, _Compiled] = {}
        self._absent: set[int] = set()
        self._decode_only = False
        self.backoff_initial_s = settings.retry_backoff_initial_s if settings else 0.5
        self.backoff_max_s = settings.retry_backoff_max_s if settings else 30.0

    # -- the registry side ----------------------------------------------------------

    def _registry(self) -> Any:
        if self._client is None:
            if self._settings is None or self._decode_only:
                raise SchemaNotEnsured(
                    "this decoder has no registry client (a decode-only copy, or built "
                    "without settings): call ensure() on the original"
                )
            # Lazy: the registry client pulls ~400 modules (httpx2, authlib; ~240 ms), which
            # a decode-only copy in a worker process never needs.
            from confluent_kafka.schema_registry import SchemaRegistryClient  # noqa: PLC0415

            self._client = SchemaRegistryClient(self._settings.client_config())
        return self._client

    def known(self, schema_id: int) -> bool:
        """Whether ``schema_id`` is cached or known absent (``decode`` needs no network)."""
        return schema_id in self._compiled or schema_id in self._absent

    def ensure(
        self,
        ids: Iterable[int],
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_retry: Callback | None = None,
    ) -> None:
        """Fetch every id not yet known; return once each is cached or known absent.

        A 404 with the registry's "schema not found" code marks an id absent (``decode``
        then raises ``unknown_schema``). Anything else that is not a schema (connection
        refused, timeout, 5xx, 429, 401/403, a 404 that is not the registry's) is a
        :class:`SchemaRegistryUnavailable` passed to ``on_retry``; then it waits
        ``backoff_initial_s`` doubling up to ``backoff_max_s`` (with jitter) and retries, for
        as long as it takes. ``should_stop`` is polled before each attempt and during waits:
        when true, raises :class:`RegistryWaitInterrupted` (what was fetched stays cached).
        """
        pending = sorted({int(i) for i in ids if not self.known(int(i))})
        failures = 0
        while pending:
            if should_stop():
                raise RegistryWaitInterrupted(
                    f"stopped while waiting for the schema registry ({len(pending)} schema "
                    f"ids still unknown: {pending[:5]})"
                )
            schema_id = pending[0]
            error = self._fetch(schema_id)
            if error is None:
                pending.pop(0)
                failures = 0
                continue
            if on_retry is not None:
                on_retry(error)
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2**failures)
            failures = min(failures + 1, 62)
            self._wait(delay * random.uniform(0.5, 1.0), should_stop)

    def _fetch(self, schema_id: int) -> SchemaRegistryUnavailable | None:
        """One attempt: cache the schema or the 404; return the error to retry on."""
        client = self._registry()  # imports the client package; this import is then free
        from confluent_kafka.schema_registry.error import SchemaRegistryError  # noqa: PLC0415

        try:
            schema = client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            status = exc.http_status_code
            if status == 404 and exc.error_code == _SR_SCHEMA_NOT_FOUND:
                self._absent.add(schema_id)
                return None
            hint = ""
            if status in (401, 403):
                hint = " (check schema_registry.basic_auth_*)"
            elif status == 404:
                hint = " (not a schema registry answer: check schema_registry.url)"
            return SchemaRegistryUnavailable(
                f"schema registry answered HTTP {status} for schema id {schema_id}{hint}: "
                f"{str(exc.error_message)[:_MAX_DETAIL]}"
            )
        except Exception as exc:  # transport errors, timeouts, answers that are not schemas
            return SchemaRegistryUnavailable(
                f"schema registry unreachable for schema id {schema_id}: {_short(exc)}"
            )
        try:
            raw = _Raw(
                schema_type=str(schema.schema_type or "AVRO"),
                schema_str=str(schema.schema_str),
                has_references=bool(schema.references),
            )
        except Exception as exc:
            return SchemaRegistryUnavailable(
                f"schema registry answer for schema id {schema_id} is not a schema: {_short(exc)}"
            )
        self._raw[schema_id] = raw
        self._compiled[schema_id] = _compile(raw)
        return None

    @staticmethod
    def _wait(seconds: float, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + seconds
        pause = threading.Event()  # never set: wait() is an interruptible-by-poll sleep
        while (left := deadline - time.monotonic()) > 0:
            if should_stop():
                return  # ensure() raises on its next check
            pause.wait(min(left, 0.05))

    # -- the pure side --------------------------------------------------------------

    def decode(self, value: bytes) -> tuple[Any, int]:
        """The decoded object (a dict for a record) and its schema id. Never touches the
        network. Raises :class:`WireFormatError` for every problem of the value and
        :class:`SchemaNotEnsured` if ``ensure`` never saw its id."""
        schema_id = _frame_id(value)
        if schema_id is None:
            size = len(value) if isinstance(value, bytes | bytearray) else 0
            detail = (
                f"{size} bytes, shorter than the 5-byte header"
                if size < HEADER_SIZE
                else f"magic byte {value[0]}, expected 0"
            )
            raise WireFormatError(BAD_FRAME, f"not a Confluent wire-format value: {detail}")
        compiled = self._compiled.get(schema_id)
        if compiled is None:
            if schema_id in self._absent:
                raise WireFormatError(
                    UNKNOWN_SCHEMA, f"schema id {schema_id} is not in the registry", schema_id
                )
            raise SchemaNotEnsured(f"schema id {schema_id}: call ensure() before decode()")
        payload = bytes(value[HEADER_SIZE:])
        if compiled.kind == "avro":
            return self._decode_avro(payload, compiled.parsed, schema_id), schema_id
        if compiled.kind == "json":
            return self._decode_json(payload, compiled.parsed, schema_id), schema_id
        raise WireFormatError(
            UNSUPPORTED_SCHEMA, f"schema id {schema_id}: {compiled.parsed}", schema_id
        )

    @staticmethod
    def _decode_avro(payload: bytes, parsed: Any, schema_id: int) -> Any:
        stream = io.BytesIO(payload)
        try:
            obj = fastavro.schemaless_reader(stream, parsed, None)
        except Exception as exc:  # EOFError, ValueError, UnicodeDecodeError, MemoryError...
            raise WireFormatError(
                MALFORMED_AVRO,
                f"schema id {schema_id}: Avro payload does not decode: {_short(exc)}",
                schema_id,
            ) from None
        if stream.tell() != len(payload):
            # Avro has no length prefix: bytes left over mean the writer used another schema.
            raise WireFormatError(
                MALFORMED_AVRO,
                f"schema id {schema_id}: {len(payload) - stream.tell()} bytes left after "
                "the Avro record",
                schema_id,
            )
        return obj

    @staticmethod
    def _decode_json(payload: bytes, validator: Any, schema_id: int) -> Any:
        try:
            # msgspec: strict JSON (no NaN/Infinity literals), ~10x json.loads.
            obj = msgspec.json.decode(payload)
        except Exception as exc:
            raise WireFormatError(
                MALFORMED_JSON,
                f"schema id {schema_id}: payload is not JSON: {_short(exc)}",
                schema_id,
            ) from None
        try:
            if validator.is_valid(obj):  # the fast path: no error objects built
                return obj
            error = next(iter(validator.iter_errors(obj)))
            where = "/".join(str(p) for p in error.instance_path) or "(root)"
            detail = f"{where}: {error.message}"
        except Exception as exc:  # a pathological pattern, a number beyond 64 bits...
            detail = f"validation failed: {_short(exc)}"
        raise WireFormatError(
            JSON_SCHEMA_INVALID,
            f"schema id {schema_id}: does not match its JSON Schema: {detail[:_MAX_DETAIL]}",
            schema_id,
        )

    # -- lifecycle, pickling --------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP client it built (idempotent; a client passed in is the caller's).
        The cache stays usable for ``decode``; a later ``ensure`` builds a new client."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close()
        self._owns_client = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Schemas only: the client holds the password and sockets, the settings a SecretStr.
        return {
            "raw": dict(self._raw),
            "absent": set(self._absent),
            "backoff": (self.backoff_initial_s, self.backoff_max_s),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._settings = None
        self._client = None
        self._owns_client = True
        self._decode_only = True
        self._raw = dict(state["raw"])
        self._absent = set(state["absent"])
        self._compiled = {sid: _compile(raw) for sid, raw in self._raw.items()}
        self.backoff_initial_s, self.backoff_max_s = state["backoff"]

    def schema_ids(self, values: Sequence[bytes | None]) -> set[int]:
        """Same as the module's :func:`schema_ids` (convenience)."""
        return schema_ids(values)
