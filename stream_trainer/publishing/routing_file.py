"""``<registry root>/<model>/ROUTING.json``: how a scoped model's keys find their slot,
written once (docs/design/scale-out.md, 6.1).

Content (canonical JSON)::

    {"model_name": "fraud", "scope": "partition", "key_source": "kafka_key",
     "partitioner": "murmur2", "partitions": 6, "topic": "orders"}

Create-only: the first writer creates it (a hard link of a complete temp file in a
folder, ``If-None-Match`` on a store), a later writer with the same content accepts it,
one with different content is refused (:class:`RoutingConflict`, naming both). A reader
of the model's events and a reader of this file therefore never disagree on routing
without an operator having removed the file.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.events import canonical_event
from stream_trainer.publishing.registry import RegistryUnavailable, _fsync_dir, _write_durable
from stream_trainer.publishing.scoped_versions import SCOPES, Routing, ScopedEventError
from stream_trainer.state.objectstore import (
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
)

ROUTING_FILE = "ROUTING.json"


class RoutingConflict(StreamTrainerError):
    """``ROUTING.json`` exists with a different routing than this writer's."""


def routing_document(model_name: str, scope: str, routing: Routing) -> dict[str, Any]:
    """The content of the model's ``ROUTING.json``."""
    if not model_name or "/" in model_name:
        raise ScopedEventError(f"model name must be non-empty without '/': {model_name!r}")
    if scope not in SCOPES:
        raise ScopedEventError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return {"model_name": model_name, "scope": scope, **routing.to_json()}


def _create_in_folder(path: Path, data: bytes) -> bytes | None:
    """Create ``path`` with ``data`` unless it exists; None when created, else what it
    holds. A hard link of a complete, fsynced temp file: never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        _write_durable(tmp, data)
        os.link(tmp, path)  # fails if path exists: create-only
    except FileExistsError:
        return path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return None


def _create_in_store(store: ObjectStore, key: str, data: bytes) -> bytes | None:
    try:
        store.put_if_absent(key, data)
        return None
    except ObjectExists:
        return store.get(key).data
    except ObjectStoreError as error:
        raise RegistryUnavailable(str(error)) from error


def write_routing(
    root: Path | ObjectStore, model_name: str, scope: str, routing: Routing
) -> dict[str, Any]:
    """Create ``<root>/<model_name>/ROUTING.json`` (``root`` a registry folder or the
    registry's store) or accept the identical one there; returns the content. Raises
    RoutingConflict, changing nothing, when it holds another routing (or is unreadable),
    RegistryUnavailable on a store error."""
    document = routing_document(model_name, scope, routing)
    data = canonical_event(document)
    if isinstance(root, Path):
        path = root.absolute() / model_name / ROUTING_FILE
        where = str(path)
        existing = _create_in_folder(path, data)
    else:
        key = f"{model_name}/{ROUTING_FILE}"
        where = root.url_of(key)
        try:
            existing = _create_in_store(root, key, data)
        except ObjectStoreError as error:  # the read of an existing one
            raise RegistryUnavailable(str(error)) from error
    if existing is None:
        return document
    try:
        stored = json.loads(existing)
    except ValueError:
        stored = existing.decode(errors="replace")
    if stored != document:
        raise RoutingConflict(
            f"{where} holds routing {json.dumps(stored, sort_keys=True)}, this writer's is "
            f"{json.dumps(document, sort_keys=True)}: ROUTING.json is written once; a new "
            "routing (partitioner, partition count, key source, scope) needs a new model "
            "name, or the file removed once no reader depends on the old one"
        )
    return document


def read_routing(root: Path | ObjectStore, model_name: str) -> tuple[str, Routing] | None:
    """``(scope, routing)`` from ``<root>/<model_name>/ROUTING.json``, None when there is
    none (a global model, or nothing published yet); what a tool acting on a slot (a
    promote's ``scoped_champion`` event) needs. RoutingConflict when it is malformed,
    RegistryUnavailable on a store error."""
    if isinstance(root, Path):
        path = root.absolute() / model_name / ROUTING_FILE
        where = str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
    else:
        key = f"{model_name}/{ROUTING_FILE}"
        where = root.url_of(key)
        try:
            data = root.get(key).data
        except ObjectNotFound:
            return None
        except ObjectStoreError as error:
            raise RegistryUnavailable(str(error)) from error
    try:
        stored = json.loads(data)
        scope = stored["scope"]
        if stored["model_name"] != model_name or scope not in SCOPES:
            raise ValueError(f"model {stored['model_name']!r}, scope {scope!r}")
        return scope, Routing.from_json(stored)
    except (ValueError, KeyError, TypeError) as error:
        raise RoutingConflict(f"{where} is not a routing of {model_name!r}: {error}") from None
