"""The Confluent wire format decoder without a network: framing, reasons, retries, purity.

The registry is a stub client (``get_schema`` answering from a dict, or raising what
confluent-kafka's client raises); the real registry is in
tests/integration/test_schema_registry.py.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import socket
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError

from stream_trainer.config import SchemaRegistrySettings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.wire import (
    BAD_FRAME,
    JSON_SCHEMA_INVALID,
    MALFORMED_AVRO,
    MALFORMED_JSON,
    REASONS,
    UNKNOWN_SCHEMA,
    UNSUPPORTED_SCHEMA,
    RegistryWaitInterrupted,
    SchemaNotEnsured,
    SchemaRegistryUnavailable,
    WireDecoder,
    WireFormatError,
    frame,
    schema_ids,
)

AVRO_ID, JSON_ID, PROTO_ID, MISSING_ID = 1, 2, 3, 404
AVRO_SCHEMA = {
    "type": "record",
    "name": "Txn",
    "fields": [
        {"name": "amount", "type": "double"},
        {"name": "country", "type": "string"},
        {"name": "flag", "type": "boolean"},
        {"name": "device", "type": ["null", {"type": "enum", "name": "D", "symbols": ["a", "b"]}]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "scores", "type": {"type": "map", "values": "long"}},
        {"name": "raw", "type": "bytes"},
    ],
}
JSON_SCHEMA = {
    "type": "object",
    "properties": {"amount": {"type": "number"}, "flag": {"type": "boolean"}},
    "required": ["amount"],
}
RECORD = {
    "amount": 1.5,
    "country": "DE",
    "flag": True,
    "device": None,
    "tags": ["x", "y"],
    "scores": {"k": 3},
    "raw": b"\x00\x01",
}


def _avro(record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(AVRO_SCHEMA), record)
    return frame(AVRO_ID, out.getvalue())


class StubRegistry:
    """``get_schema`` like confluent-kafka's client; ``failures`` raise first, in order."""

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.schemas = {
            AVRO_ID: Schema(json.dumps(AVRO_SCHEMA), "AVRO"),
            JSON_ID: Schema(json.dumps(JSON_SCHEMA), "JSON"),
            PROTO_ID: Schema('syntax = "proto3"; message M {}', "PROTOBUF"),
        }
        self.failures = list(failures or [])
        self.calls: list[int] = []

    def get_schema(self, schema_id: int) -> Schema:
        self.calls.append(schema_id)
        if self.failures:
            raise self.failures.pop(0)
        if schema_id not in self.schemas:
            raise SchemaRegistryError(404, 40403, f"Schema {schema_id} not found")
        return self.schemas[schema_id]


def _decoder(stub: StubRegistry | None = None) -> WireDecoder:
    decoder = WireDecoder(client=stub or StubRegistry())
    decoder.backoff_initial_s = decoder.backoff_max_s = 0.001
    return decoder


@pytest.fixture
def ready() -> WireDecoder:
    decoder = _decoder()
    decoder.ensure({AVRO_ID, JSON_ID, PROTO_ID, MISSING_ID})
    return decoder


def test_frame_is_magic_byte_then_big_endian_id() -> None:
    assert frame(0x01020304, b"p") == b"\x00\x01\x02\x03\x04p"


def test_schema_ids_ignores_values_without_a_frame() -> None:
    values = [
        frame(7, b"a"),
        frame(7, b"b"),
        frame(2**32 - 1, b""),
        None,
        b"",
        b"\x00\x00",
        b"\x01\x00\x00\x00\x09x",
    ]
    assert schema_ids(values) == {7, 2**32 - 1}


def test_decode_avro_returns_python_objects_and_the_id(ready: WireDecoder) -> None:
    assert ready.decode(_avro(RECORD)) == (RECORD, AVRO_ID)
    assert ready.decode(_avro({**RECORD, "device": "b"}))[0]["device"] == "b"


def test_decode_json_schema_returns_the_object(ready: WireDecoder) -> None:
    assert ready.decode(frame(JSON_ID, b'{"amount": 2, "flag": false}')) == (
        {"amount": 2, "flag": False},
        JSON_ID,
    )


@pytest.mark.parametrize(
    ("value", "reason", "needle"),
    [
        (b"", BAD_FRAME, "shorter"),
        (b"\x00\x00\x01", BAD_FRAME, "shorter"),
        (b"\x01\x00\x00\x00\x01\x00", BAD_FRAME, "magic byte 1"),
        (b'{"amount": 1}', BAD_FRAME, "magic byte 123"),
        (frame(MISSING_ID, b"\x00"), UNKNOWN_SCHEMA, "schema id 404"),
        (frame(PROTO_ID, b"\x00"), UNSUPPORTED_SCHEMA, "PROTOBUF"),
        (frame(AVRO_ID, b"\x02"), MALFORMED_AVRO, "schema id 1"),
        (_avro(RECORD) + b"\x00", MALFORMED_AVRO, "1 bytes left"),
        (frame(JSON_ID, b'{"amount": '), MALFORMED_JSON, "not JSON"),
        (frame(JSON_ID, b'{"amount": NaN}'), MALFORMED_JSON, "not JSON"),
        (frame(JSON_ID, b"\xff\xfe"), MALFORMED_JSON, "not JSON"),
        (frame(JSON_ID, b'{"amount": "1"}'), JSON_SCHEMA_INVALID, "amount"),
        (frame(JSON_ID, b'{"flag": true}'), JSON_SCHEMA_INVALID, '"amount" is a required'),
    ],
)
def test_every_bad_value_has_its_reason(
    ready: WireDecoder, value: bytes, reason: str, needle: str
) -> None:
    with pytest.raises(WireFormatError) as info:
        ready.decode(value)
    assert info.value.reason == reason
    assert reason in REASONS
    assert needle in info.value.message
    assert isinstance(info.value, StreamTrainerError)
    copy = pickle.loads(pickle.dumps(info.value))  # crosses the decode worker's pipe
    assert (copy.reason, copy.message) == (reason, info.value.message)


def test_decode_touches_no_network_after_ensure(ready: WireDecoder) -> None:
    stub = ready._client
    assert isinstance(stub, StubRegistry)
    calls = list(stub.calls)
    for _ in range(100):
        ready.decode(_avro(RECORD))
        with pytest.raises(WireFormatError):
            ready.decode(frame(MISSING_ID, b""))
    ready.ensure({AVRO_ID, MISSING_ID})  # already known: no request either
    assert stub.calls == calls


def test_decode_of_an_id_ensure_never_saw_is_a_caller_error_not_bad_data() -> None:
    with pytest.raises(SchemaNotEnsured) as info:
        _decoder().decode(frame(AVRO_ID, b""))
    assert not isinstance(info.value, WireFormatError)


def _garbage(rng: random.Random, valid: bytes) -> list[bytes]:
    out = [valid[:n] for n in range(len(valid))]  # every truncation
    out += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))) for _ in range(2000)]
    for sid in (AVRO_ID, JSON_ID, PROTO_ID, MISSING_ID):
        out += [
            frame(sid, bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 48))))
            for _ in range(1500)
        ]
    # Huge lengths: zigzag varints of 2**62 and -2**62 where a string / array / bytes size goes.
    huge = b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"
    out += [
        frame(AVRO_ID, b"\x00" * 8 + huge),
        frame(AVRO_ID, b"\x00" * 8 + b"\x02DE\x01\x00" + huge),
    ]
    out += [frame(AVRO_ID, b"\x00" * 8 + b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")]
    out += [frame(JSON_ID, b"[" * 100_000), frame(JSON_ID, b'{"amount": 1e999999}')]
    return out


def test_decode_never_raises_anything_else_on_garbage(ready: WireDecoder) -> None:
    rng = random.Random(22)
    reasons: dict[str, int] = {}
    decoded = 0
    values = _garbage(rng, _avro(RECORD))
    ready.ensure(schema_ids(values))  # as the service does per unit: unknown ids are 404s
    for value in values:
        try:
            ready.decode(value)
            decoded += 1
        except WireFormatError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            assert len(exc.message) < 400
    print(f"garbage: {decoded} decoded, rejected by reason {reasons}")
    assert set(reasons) == {
        BAD_FRAME,
        UNKNOWN_SCHEMA,
        UNSUPPORTED_SCHEMA,
        MALFORMED_AVRO,
        MALFORMED_JSON,
    }


def test_ensure_retries_outages_and_reports_each(monkeypatch: pytest.MonkeyPatch) -> None:
    from confluent_kafka.schema_registry.common._httpx_compat import httpx

    failures: list[Exception] = [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        SchemaRegistryError(503, 50003, "unavailable"),
        SchemaRegistryError(429, 42900, "slow down"),
        SchemaRegistryError(401, 40101, "unauthorized"),
        SchemaRegistryError(404, -1, "<html>nginx</html>"),  # not the registry's 404
    ]
    stub = StubRegistry(failures)
    decoder = _decoder(stub)
    errors: list[SchemaRegistryUnavailable] = []
    decoder.ensure({AVRO_ID}, on_retry=errors.append)
    assert len(errors) == len(failures)
    assert "ConnectError" in str(errors[0]) and "ReadTimeout" in str(errors[1])
    assert "HTTP 503" in str(errors[2]) and "HTTP 429" in str(errors[3])
    assert "basic_auth" in str(errors[4]) and "schema_registry.url" in str(errors[5])
    assert decoder.decode(_avro(RECORD))[1] == AVRO_ID  # no value was given up on


def test_backoff_doubles_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(WireDecoder, "_wait", staticmethod(lambda s, _stop: waits.append(s)))
    monkeypatch.setattr("stream_trainer.ingest.wire.random.uniform", lambda _a, _b: 1.0)
    decoder = WireDecoder(
        SchemaRegistrySettings(
            url="http://127.0.0.1:1", retry_backoff_initial_s=0.5, retry_backoff_max_s=3.0
        ),
        client=StubRegistry([SchemaRegistryError(500, 50001, "boom")] * 6),
    )
    decoder.ensure({AVRO_ID})
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_ensure_stops_when_asked_while_waiting() -> None:
    from confluent_kafka.schema_registry.common._httpx_compat import httpx

    stub = StubRegistry([httpx.ConnectError("refused")] * 100)
    decoder = _decoder(stub)
    asked = iter([False, False, True])
    with pytest.raises(RegistryWaitInterrupted) as info:
        decoder.ensure({AVRO_ID}, should_stop=lambda: next(asked, True))
    assert isinstance(info.value, StreamTrainerError)
    assert not decoder.known(AVRO_ID)


def test_pickled_copy_decodes_without_client_or_secret(ready: WireDecoder) -> None:
    password = "registry-password-never-pickled"
    settings = SchemaRegistrySettings(
        url="http://127.0.0.1:1", basic_auth_user="u", basic_auth_password=password
    )
    decoder = WireDecoder(settings, client=ready._client)
    decoder.ensure({AVRO_ID, JSON_ID, MISSING_ID})
    blob = pickle.dumps(decoder)
    assert password.encode() not in blob
    assert b"stream_trainer.config" not in blob and b"StubRegistry" not in blob
    copy: WireDecoder = pickle.loads(blob)
    assert copy.decode(_avro(RECORD)) == (RECORD, AVRO_ID)
    with pytest.raises(WireFormatError, match="schema id 404"):
        copy.decode(frame(MISSING_ID, b""))
    with pytest.raises(SchemaNotEnsured):
        copy.ensure({PROTO_ID})  # decode-only: no client to fetch with
    print(f"pickled decoder with 3 ids: {len(blob)} bytes")


def test_client_config_carries_auth_and_tls_but_turns_client_retries_off(
    tmp_path: Any,
) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\n")
    settings = SchemaRegistrySettings(
        url="https://sr:8081",
        basic_auth_user="svc",
        basic_auth_password_file=secret_file,
        ssl_ca_location=tmp_path / "ca.pem",
        request_timeout_s=3,
    )
    conf = settings.client_config()
    assert conf["basic.auth.user.info"] == "svc:from-file"
    assert conf["ssl.ca.location"] == str(tmp_path / "ca.pem")
    assert conf["max.retries"] == 0 and conf["timeout"] == 3
    assert "from-file" not in repr(settings) and "from-file" not in json.dumps(
        settings.model_dump(mode="json")
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"url": "registry:8081"},
        {"url": "http://sr", "basic_auth_user": "u"},
        {"url": "http://sr", "basic_auth_password": "p"},
        {"url": "http://sr", "retry_backoff_initial_s": 5, "retry_backoff_max_s": 1},
        {"url": "http://user:pw@sr:8081"},
    ],
)
def test_invalid_registry_settings_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"url|basic|backoff|credentials"):
        SchemaRegistrySettings(**fields)


def test_outage_errors_never_carry_the_password() -> None:
    password = "registry-password-in-no-error"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        settings = SchemaRegistrySettings(
            url=f"http://127.0.0.1:{closed.getsockname()[1]}",
            basic_auth_user="svc",
            basic_auth_password=password,
            retry_backoff_initial_s=0.001,
            retry_backoff_max_s=0.001,
        )
        errors: list[SchemaRegistryUnavailable] = []
        with WireDecoder(settings) as decoder, pytest.raises(RegistryWaitInterrupted) as info:
            decoder.ensure({AVRO_ID}, should_stop=lambda: len(errors) >= 2, on_retry=errors.append)
    assert len(errors) == 2 and "ConnectError" in str(errors[0])
    for text in [*map(str, errors), str(info.value), repr(settings)]:
        assert password not in text
