"""``stream-trainer bench --decode-only``: the decoder alone, on the same records in each format.

One dataset with typed features (``transactions`` by default), ``N`` records, each decoded
by :meth:`RecordDecoder.decode_values` in units of 1000 (as the service decodes) in every
path, in this process, no broker:

* ``numeric_json``: today's all-numeric path, the baseline: the same records projected to
  numbers (:func:`numeric_projection`) with a plain names contract;
* ``typed_json``: the records as they are, with the dataset's typed contract;
* ``avro``: Confluent wire-format Avro (schema from :func:`produce.avro_schema`);
* ``json_schema``: Confluent wire-format JSON validated by its JSON Schema.

The wire formats' schemas are registered in a real registry when a URL is given (and
fetched from it by :meth:`WireDecoder.ensure`), otherwise served to the decoder from memory
(:class:`StaticSchemas`). Both happen before the timing: rates cover decoding only. The
paths run interleaved within each repeat, so a slow minute slows all of them; ratios to the
baseline are reported of the medians and per repeat. Nothing is asserted about time.
"""

from __future__ import annotations

import gc
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro
import msgspec

from stream_trainer.config import RecordSettings, SchemaRegistrySettings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.features import FeatureContract
from stream_trainer.ingest.records import RecordDecoder
from stream_trainer.ingest.wire import WireDecoder, frame
from stream_trainer.laptop.benchmarks import report as rep
from stream_trainer.laptop.datasets import Dataset, Row
from stream_trainer.laptop.produce import avro_schema, json_schema

UNIT = 1000  # values per decode_values call, as the service decodes a unit
BASELINE = "numeric_json"
PATHS = (BASELINE, "typed_json", "avro", "json_schema")
TARGET = 0.8  # issue 22: each typed / wire path >= 0.8 of the all-numeric JSON path
STATIC_SCHEMA_ID = 1  # the id the in-memory schema source serves (no registry)
REGISTRY_WAIT_S = 60.0

_encode = msgspec.json.Encoder().encode


class DecodeBenchError(StreamTrainerError):
    """A path rejected records the bench produced (a bug: the rates would be meaningless)."""


def numeric_projection(
    contract: FeatureContract, x: dict[str, Any], open_codes: dict[str, dict[Any, int]]
) -> dict[str, float]:
    """``x`` as today's all-numeric record: each feature a finite number, every key present.

    The contract's own column value (listed category -> its index, the "other" bucket ->
    ``len(categories)``, boolean -> 1.0 / 0.0), missing -> 0.0; an open-list category gets a
    small index of first sight (kept in ``open_codes``, per feature) instead of its 53-bit
    hash code, so the baseline's JSON is no longer than the typed record's for that feature
    (16-digit codes would make the baseline slower, flattering the typed paths)."""
    out: dict[str, float] = {}
    for index, feature in enumerate(contract.features):
        value = x.get(feature.name)
        if value is None:
            out[feature.name] = 0.0
        elif feature.type == "category" and feature.categories is None:
            seen = open_codes.setdefault(feature.name, {})
            out[feature.name] = float(seen.setdefault(value, len(seen)))
        else:
            out[feature.name] = contract.encode_value(index, True, value)
    return out


class StaticSchemas:
    """A schema source for :class:`WireDecoder` that serves fixed schemas from memory: the
    ``client`` it takes (``get_schema(id)``) without a registry. An unknown id answers like
    the registry's 404 would not: with KeyError, which ``ensure`` retries; the bench only
    asks for the ids it serves."""

    def __init__(self, schemas: dict[int, tuple[str, str]]) -> None:
        from confluent_kafka.schema_registry import Schema  # noqa: PLC0415 - lazy, heavy

        self._schemas = {
            schema_id: Schema(text, kind) for schema_id, (text, kind) in schemas.items()
        }

    def get_schema(self, schema_id: int) -> Any:
        """The schema served under ``schema_id``."""
        return self._schemas[schema_id]

    def close(self) -> None:
        """Nothing to release."""


def record_settings(dataset: Dataset, value_format: str, typed: bool) -> RecordSettings:
    """The record contract of ``dataset`` (its typed features, or their plain names)."""
    features: list[Any] = dataset.record_features if typed else list(dataset.features)
    return RecordSettings.model_validate(
        {
            "format": value_format,
            "features": features,
            "features_field": "x",
            "label_field": "y",
            "labels": list(dataset.labels or []) or None,
        }
    )


@dataclass
class DecodePath:
    """One path: its values and the decoder that reads them (schemas already fetched)."""

    name: str
    values: list[bytes]
    decoder: RecordDecoder
    wire: WireDecoder | None = None

    @property
    def bytes_per_record(self) -> float:
        """Mean value size."""
        return sum(map(len, self.values)) / len(self.values) if self.values else math.nan

    def close(self) -> None:
        """Release the registry client, if any."""
        if self.wire is not None:
            self.wire.close()


def _register(url: str, subject: str, text: str, kind: str) -> int:
    from confluent_kafka.schema_registry import (  # noqa: PLC0415 - lazy, heavy
        Schema,
        SchemaRegistryClient,
    )

    with SchemaRegistryClient({"url": url}) as client:
        return int(client.register_schema(subject, Schema(text, kind)))


def _avro_payloads(dataset: Dataset, rows: list[Row]) -> tuple[dict[str, Any], list[bytes]]:
    document = avro_schema(dataset)
    parsed = fastavro.parse_schema(document)
    payloads: list[bytes] = []
    for x, y in rows:
        stream = io.BytesIO()
        fastavro.schemaless_writer(stream, parsed, {"x": x, "y": y})
        payloads.append(stream.getvalue())
    return document, payloads


def _json_schema_payloads(dataset: Dataset, rows: list[Row]) -> tuple[dict[str, Any], list[bytes]]:
    # The schema requires every feature (a nullable one may be null): an absent feature is
    # written as null, as a producer that validates its records must.
    names = dataset.features
    payloads = [_encode({"x": {n: x.get(n) for n in names}, "y": y}) for x, y in rows]
    return json_schema(dataset), payloads


# path -> (schema type, record.format, the schema and the payloads of the rows)
_WIRE: dict[str, tuple[str, str, Callable[[Dataset, list[Row]], tuple[Any, list[bytes]]]]] = {
    "avro": ("AVRO", "avro", _avro_payloads),
    "json_schema": ("JSON", "json_schema", _json_schema_payloads),
}


def build_paths(
    dataset: Dataset,
    records: int,
    *,
    registry_url: str | None = None,
    paths: Sequence[str] = PATHS,
    seed: int = 42,
    subject_prefix: str = "bench-decode",
) -> list[DecodePath]:
    """Encode ``records`` rows of ``dataset`` in each of ``paths`` and build their decoders.

    With ``registry_url`` the wire schemas are registered there (subjects
    ``<subject_prefix>-<path>-value``) and fetched back by the decoder's ``ensure``; without,
    they are served from memory. Network only here, never while timing."""
    unknown = [name for name in paths if name not in PATHS]
    if unknown:
        raise ValueError(f"unknown decode path {unknown[0]!r}; choose from {', '.join(PATHS)}")
    task = dataset.task
    rows = list(dataset.rows(records, seed))
    contract = FeatureContract.from_settings(record_settings(dataset, "json", typed=True))
    out: list[DecodePath] = []
    for name in paths:
        if name == BASELINE:
            codes: dict[str, dict[Any, int]] = {}
            values = [
                _encode({"x": numeric_projection(contract, x, codes), "y": y}) for x, y in rows
            ]
            record = record_settings(dataset, "json", typed=False)
            out.append(DecodePath(name, values, RecordDecoder(record, task)))
        elif name == "typed_json":
            values = [_encode({"x": x, "y": y}) for x, y in rows]
            record = record_settings(dataset, "json", typed=True)
            out.append(DecodePath(name, values, RecordDecoder(record, task)))
        else:
            kind, value_format, encode = _WIRE[name]
            document, payloads = encode(dataset, rows)
            wire, schema_id = _wire_decoder(
                name, json.dumps(document), kind, registry_url, subject_prefix
            )
            values = [frame(schema_id, payload) for payload in payloads]
            record = record_settings(dataset, value_format, typed=True)
            decoder = RecordDecoder(record, task, wire)
            # The network call, before any timing; a registry that does not answer within
            # a minute ends the bench (RegistryWaitInterrupted) instead of hanging it.
            wire.ensure({schema_id}, should_stop=_after(REGISTRY_WAIT_S))
            out.append(DecodePath(name, values, decoder, wire))
    return out


def _after(seconds: float) -> Callable[[], bool]:
    """True once ``seconds`` have passed from now."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def _wire_decoder(
    name: str, text: str, kind: str, registry_url: str | None, subject_prefix: str
) -> tuple[WireDecoder, int]:
    if registry_url is None:
        source = StaticSchemas({STATIC_SCHEMA_ID: (text, kind)})
        return WireDecoder(client=source), STATIC_SCHEMA_ID
    schema_id = _register(registry_url, f"{subject_prefix}-{name}-value", text, kind)
    return WireDecoder(SchemaRegistrySettings(url=registry_url)), schema_id


def time_decode(path: DecodePath, unit: int = UNIT) -> float:
    """Seconds ``path``'s decoder takes over all its values, unit by unit.

    Raises DecodeBenchError when any value is rejected."""
    decode = path.decoder.decode_values
    values = path.values
    units = [values[i : i + unit] for i in range(0, len(values), unit)]
    accepted = 0
    seconds = 0.0
    clock = time.perf_counter
    for chunk in units:
        t0 = clock()
        decoded = decode(chunk)
        seconds += clock() - t0
        accepted += len(decoded.valid_index)
        if decoded.rejects:
            _, rejection = decoded.rejects[0]
            raise DecodeBenchError(
                f"{path.name}: {len(decoded.rejects)} records rejected ({rejection.reason}: "
                f"{rejection.message})"
            )
    if accepted != len(values):
        raise DecodeBenchError(f"{path.name}: decoded {accepted} of {len(values)} records")
    return seconds


def ratios(rates: dict[str, float], baseline: str = BASELINE) -> dict[str, float]:
    """Each path's rate over the baseline's (NaN when the baseline has none)."""
    return {
        name: rep.ratio(rate, rates[baseline]) for name, rate in rates.items() if name != baseline
    }


def summarize(
    runs: list[dict[str, float]], sizes: dict[str, float], records: int
) -> dict[str, Any]:
    """The report's numbers from per-repeat seconds by path: rates (median, spread), ratios
    to the baseline of the medians and per repeat, and the target verdicts."""
    names = list(runs[0]) if runs else []
    rates = {name: [records / r[name] if r[name] > 0 else math.nan for r in runs] for name in names}
    paths = {
        name: {
            "records_per_s": rep.spread(rates[name]),
            "us_per_record": rep.spread([1e6 / v if v else math.nan for v in rates[name]]),
            "bytes_per_record": sizes[name],
        }
        for name in names
    }
    medians = {name: float(rep.spread(rates[name])["median"]) for name in names}
    of_medians = ratios(medians) if BASELINE in medians else {}
    per_repeat = {
        name: rep.spread([ratios({k: rates[k][i] for k in names})[name] for i in range(len(runs))])
        for name in of_medians
    }
    targets = {
        name: {
            "value": value,
            "target": f">= {TARGET}",
            "met": None if math.isnan(value) else value >= TARGET,
        }
        for name, value in of_medians.items()
    }
    return {
        "paths": paths,
        "ratios": of_medians,
        "ratios_per_repeat": per_repeat,
        "targets": targets,
    }


def run_decode_bench(
    dataset: Dataset,
    records: int,
    repeats: int,
    *,
    registry_url: str | None = None,
    paths: Sequence[str] = PATHS,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Build the paths, time each ``repeats`` times (interleaved), return the report."""
    progress(f"encoding {records:,} {dataset.name} records in {len(paths)} formats")
    built = build_paths(dataset, records, registry_url=registry_url, paths=paths)
    try:
        for path in built:  # warm-up: first-call costs (code memos, schema caches) untimed
            path.decoder.decode_values(path.values[:UNIT])
        runs: list[dict[str, float]] = []
        for repeat in range(repeats):
            seconds: dict[str, float] = {}
            # Each repeat starts with another path, so no path always runs first (or right
            # after the one that left the most garbage); the report keeps the paths' order.
            shift = repeat % len(built)
            for path in built[shift:] + built[:shift]:
                gc.collect()  # each path starts from the same heap, not the last one's garbage
                seconds[path.name] = time_decode(path)
            runs.append({path.name: seconds[path.name] for path in built})
            progress(
                f"repeat {repeat + 1}/{repeats}: "
                + ", ".join(f"{k} {records / v:,.0f}/s" for k, v in runs[-1].items())
            )
    finally:
        for path in built:
            path.close()
    report = summarize(runs, {p.name: p.bytes_per_record for p in built}, records)
    return {
        "machine": rep.machine(),
        "workload": {
            "dataset": dataset.name,
            "records": records,
            "unit": UNIT,
            "features": len(dataset.features),
            "schemas": "registry" if registry_url else "in memory",
        },
        "repeats": repeats,
        **report,
    }


def table(report: dict[str, Any]) -> str:
    """The decode report as readable text."""
    w, m = report["workload"], report["machine"]
    lines = [
        f"stream-trainer bench --decode-only: {w['dataset']}, {w['records']:,} records x "
        f"{w['features']} features, units of {w['unit']}, {report['repeats']} repeat(s), "
        f"schemas {w['schemas']}",
        f"machine: {m['cpu_model']}, {m['cores']} cores, Python {m['python']}",
        "",
        f"{'path':<14} {'records/s med':>13} {'min':>11} {'max':>11} {'us/rec':>7} "
        f"{'bytes':>6} {'vs numeric':>10} {'per repeat [min-max]':>22}",
    ]
    for name, path in report["paths"].items():
        rate = path["records_per_s"]
        each = report["ratios_per_repeat"].get(name)
        versus = report["ratios"].get(name, 1.0)
        per = f"{each['min']:.2f}-{each['max']:.2f}" if each else ""
        lines.append(
            f"{name:<14} {rate['median']:>13,.0f} {rate['min']:>11,.0f} {rate['max']:>11,.0f} "
            f"{path['us_per_record']['median']:>7.2f} {path['bytes_per_record']:>6.0f} "
            f"{versus:>10.2f} {per:>22}"
        )
    lines += ["", f"targets (issue 22: >= {TARGET} of {BASELINE}):"]
    for name, t in report["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "unknown"}[t["met"]]
        lines.append(f"  {name:<14} {t['value']:>6.2f} (target {t['target']}): {verdict}")
    return "\n".join(lines)
