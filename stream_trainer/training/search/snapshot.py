"""The window a distributed search trains on, written once as a signed, content-addressed file.

A snapshot file is::

    b"STSNAP1\\n" | manifest length (4 bytes, big-endian) | manifest JSON | payload

named ``window-<payload sha256>.snap``. The payload is the pickled :class:`Snapshot` (the
candidate model, the search's train and validation rows, the :class:`SearchSpec`). The
manifest holds the payload's sha256 and size, the library versions and an ``hmac`` over the
canonical JSON of every other field, made with the checkpoint key (the same key and signing
as checkpoints, under its own domain-separation prefix, so neither can pass for the other).
A reader verifies the HMAC, then the payload's sha256 against the manifest and the file's
name, and only then unpickles: a trial pod never runs what the service did not write.

The snapshot holds no secret: the key signs it, the study database's URL is not in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.signing import sign, verify
from stream_trainer.state.checkpoint import library_versions

if TYPE_CHECKING:
    import numpy as np

    from stream_trainer.training.learners import ModelAdapter
    from stream_trainer.training.search.search import SearchSpec

MAGIC = b"STSNAP1\n"
_LENGTH = struct.Struct(">I")
_MAX_MANIFEST_BYTES = 1024 * 1024
_SIGNING_CONTEXT = b"stream-trainer search snapshot v1\n"
NAME = re.compile(r"^window-([0-9a-f]{64})\.snap$")


class SnapshotError(StreamTrainerError):
    """A snapshot that cannot be trusted or read: bad signature, checksum, name or format."""


@dataclass
class Snapshot:
    """What every trial of one search needs: the candidate and the time-ordered split."""

    candidate: ModelAdapter
    train: tuple[np.ndarray, np.ndarray, np.ndarray | None]
    validation: tuple[np.ndarray, np.ndarray]
    spec: SearchSpec


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def snapshot_name(sha256: str) -> str:
    """The file name of the snapshot whose payload has this sha256."""
    return f"window-{sha256}.snap"


def write_snapshot(directory: Path, snapshot: Snapshot, key: bytes) -> Path:
    """Write ``snapshot`` signed with ``key`` into ``directory`` and return its path.

    Atomic (temp file, fsync, rename, directory fsync). The name is the payload's sha256,
    so writing the same window twice leaves one file, written once."""
    if not key:
        raise SnapshotError("a search snapshot must be signed: no checkpoint HMAC key is set")
    payload = pickle.dumps(snapshot, protocol=5)
    digest = hashlib.sha256(payload).hexdigest()
    fields = {
        "format": "stream-trainer search snapshot v1",
        "created_at": time.time(),
        "payload_sha256": digest,
        "payload_size": len(payload),
        "train_records": len(snapshot.train[1]),
        "validation_records": len(snapshot.validation[1]),
        "library_versions": library_versions(),
    }
    signature = sign(key, _SIGNING_CONTEXT + _canonical(fields))
    manifest = _canonical({**fields, "hmac": signature})
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / snapshot_name(digest)
    if final.exists():
        return final
    temp = directory / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with temp.open("wb") as out:
            out.write(MAGIC + _LENGTH.pack(len(manifest)) + manifest)
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        # Readable by the trial pods' user, which may differ from the service's.
        temp.chmod(0o644)
        temp.replace(final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def read_manifest(path: Path, key: bytes) -> tuple[dict[str, Any], bytes]:
    """The verified manifest and payload bytes of the snapshot at ``path`` (not unpickled).

    Raises SnapshotError naming the file and the reason when anything does not verify."""
    match = NAME.match(path.name)
    if match is None:
        raise SnapshotError(f"search snapshot {path}: the name is not window-<sha256>.snap")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"search snapshot {path}: {error.strerror or error}") from error
    header = len(MAGIC) + _LENGTH.size
    if len(data) < header or not data.startswith(MAGIC):
        raise SnapshotError(f"search snapshot {path}: not a snapshot file (bad magic)")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > _MAX_MANIFEST_BYTES or header + length > len(data):
        raise SnapshotError(f"search snapshot {path}: truncated or corrupt manifest")
    try:
        manifest = json.loads(data[header : header + length])
        signature = manifest.pop("hmac")
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise SnapshotError(f"search snapshot {path}: unreadable manifest") from error
    if not isinstance(signature, str) or not verify(
        key, _SIGNING_CONTEXT + _canonical(manifest), signature
    ):
        raise SnapshotError(
            f"search snapshot {path}: bad signature (the manifest HMAC does not verify: "
            "tampered, or signed with another key); refusing to load it"
        )
    payload = data[header + length :]
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.get("payload_sha256") or len(payload) != manifest.get("payload_size"):
        raise SnapshotError(f"search snapshot {path}: the payload does not match its sha256")
    if digest != match.group(1):
        raise SnapshotError(f"search snapshot {path}: the name does not match the payload sha256")
    return manifest, payload


def read_snapshot(path: Path, key: bytes) -> tuple[Snapshot, str]:
    """The verified snapshot at ``path`` and its sha256. Raises SnapshotError."""
    if not key:
        raise SnapshotError(f"search snapshot {path}: no checkpoint HMAC key to verify it with")
    manifest, payload = read_manifest(path, key)
    # Unpickled only after the HMAC and the sha256 verified (the reviewed exemption, as for
    # checkpoints): the payload is exactly what the key's holder wrote.
    snapshot = pickle.loads(payload)  # noqa: S301
    if not isinstance(snapshot, Snapshot):
        raise SnapshotError(f"search snapshot {path}: the payload is not a snapshot")
    return snapshot, str(manifest["payload_sha256"])
