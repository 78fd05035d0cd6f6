"""Atomic, signed, verified checkpoints and the single-writer directory lock.

A checkpoint file is::

    b"STCKPT1\\n" | manifest length (4 bytes, big-endian) | manifest JSON | payload

The manifest is plain JSON (readable without unpickling): offsets, sequence, config hash,
library versions, metrics, the payload's sha256 and size, and an ``hmac`` field. The HMAC
covers the canonical JSON of every other manifest field, so verifying it and then the
payload's sha256 authenticates the payload before anything is unpickled. The key is never
written anywhere.

Writes go to a temp file in the same directory (``.<name>.<pid>.<rand>.tmp``), are fsynced,
renamed to ``ckpt-<sequence:012d>.ckpt`` and the directory is fsynced: a crash at any moment
leaves either the previous checkpoint or the new one, never a torn file under a final name.

Mutating operations (``write``, ``load_latest`` with its quarantine and temp-file cleanup)
belong to the one writer holding :class:`DirectoryLock`; ``inspect``, ``list`` and
``latest_manifest`` are read-only and safe from any process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import platform
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Generic, Protocol, TypeVar

import stream_trainer
from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.signing import sign, verify

log = logging.getLogger(__name__)

MAGIC = b"STCKPT1\n"
SERIALIZER = "pickle5"
QUARANTINE_DIR = "quarantine"
LOCK_FILE = ".lock"

_LENGTH = struct.Struct(">I")
_HEADER_SIZE = len(MAGIC) + _LENGTH.size
# A manifest is a few KiB; anything bigger is a corrupt length field, not a manifest.
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
_NAME = re.compile(r"^ckpt-(\d{12})\.ckpt$")
# Quarantined files keep their sequence in the name so sequences are never reused.
_QUARANTINED_NAME = re.compile(r"^ckpt-(\d{12})\.ckpt\.")
# Domain separation: a signature made with the same key over some other JSON (a model
# version's metadata) can never pass as a checkpoint manifest signature.
_SIGNING_CONTEXT = b"stream-trainer checkpoint manifest v1\n"
# Libraries whose major.minor must match for a pickled model to be trusted after load.
_CHECKED_LIBRARIES = ("python", "river", "sklearn", "numpy")

# Quarantine reasons (also returned by ``inspect``).
BAD_MAGIC = "bad_magic"
TRUNCATED = "truncated"
BAD_MANIFEST = "bad_manifest"
BAD_SIGNATURE = "bad_signature"
PAYLOAD_CHECKSUM = "payload_checksum"
SEQUENCE_MISMATCH = "sequence_mismatch"
SCOPE_MISMATCH = "scope_mismatch"
LIBRARY_MISMATCH = "library_mismatch"
UNPICKLE_FAILED = "unpickle_failed"
VALIDATION_FAILED = "validation_failed"
# Policy outcomes reported by ``inspect``; ``load_latest`` raises CheckpointError for these
# instead of quarantining, because the file is probably fine and the configuration is not.
UNSIGNED_NOT_ALLOWED = "unsigned_not_allowed"
SIGNED_NO_KEY = "signed_but_no_key"


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[tuple[str, str], ...]:
    # Distribution metadata, not imports: reading versions never imports river/sklearn.
    versions = {"python": platform.python_version(), "stream_trainer": stream_trainer.__version__}
    for key, distribution in (("river", "river"), ("sklearn", "scikit-learn"), ("numpy", "numpy")):
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = "not-installed"
    return tuple(sorted(versions.items()))


def library_versions() -> dict[str, str]:
    """Versions of python, river, sklearn, numpy and stream_trainer in this process."""
    return dict(_library_versions())


LIBRARY_VERSIONS: Callable[[], dict[str, str]] = library_versions


class CheckpointError(StreamTrainerError):
    """A checkpoint could not be written or loaded; the message says why and what to do."""


class CheckpointLocked(CheckpointError):
    """Another process holds the checkpoint directory."""


class CheckpointFenced(CheckpointError):
    """Another writer took the checkpoints over (an object store's lease or pointer): this
    one must stop, committing nothing more."""


@dataclass(frozen=True)
class CheckpointManifest:
    """What a checkpoint holds, readable without unpickling. Offsets are NEXT offsets."""

    sequence: int
    created_at: float
    offsets: dict[str, int]  # "topic:partition" -> next offset
    model_version: int | None
    config_hash: str
    library_versions: dict[str, str]
    records_learnt: int
    metrics: dict[str, Any]
    extra: dict[str, Any]
    payload_sha256: str
    payload_size: int
    serializer: str
    signed: bool
    # Set only by a slot's checkpoints (stream_trainer.state.slot_store): which slot, whose claim.
    scope: str | None = None
    scope_id: str | None = None
    token: int | None = None


# Fields the caller supplies to ``write``; the store fills in the rest.
_CALLER_FIELDS = frozenset(
    {"offsets", "model_version", "config_hash", "records_learnt", "metrics", "extra"}
)
_OPTIONAL_CALLER_FIELDS = frozenset({"created_at", "library_versions"})
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "sequence": (int,),
    "created_at": (int, float),
    "offsets": (dict,),
    "model_version": (int, type(None)),
    "config_hash": (str,),
    "library_versions": (dict,),
    "records_learnt": (int,),
    "metrics": (dict,),
    "extra": (dict,),
    "payload_sha256": (str,),
    "payload_size": (int,),
    "serializer": (str,),
    "signed": (bool,),
}
# Fields only some manifests carry (absent, not null, in the others: old checkpoints and
# their HMACs stay exactly as they were).
_OPTIONAL_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "scope": (str,),
    "scope_id": (str,),
    "token": (int,),
}


# Where a checkpoint is: a Path in a folder, a URL on an object store.
Location = TypeVar("Location", Path, str)


@dataclass(frozen=True)
class LoadedCheckpoint(Generic[Location]):
    """A verified, unpickled and validated checkpoint (``path``: a URL on an object store)."""

    manifest: CheckpointManifest
    state: Any
    path: Location


@dataclass(frozen=True)
class WriteResult(Generic[Location]):
    """A durable checkpoint: its final path, size, write duration and sequence."""

    path: Location  # a URL on an object store
    size_bytes: int
    duration_s: float
    sequence: int


class _Rejected(StreamTrainerError):
    """A file failed verification; it is quarantined under ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _PolicyRefusal(_Rejected):
    """The configuration forbids loading this file; raise instead of quarantining."""


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _finite(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None and numpy scalars by Python ones, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if not isinstance(value, str | int | float | bool | None) and callable(
        getattr(value, "item", None)
    ):
        return _finite(value.item())  # a numpy scalar from an evaluator
    return value


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _library_mismatch(recorded: dict[str, str]) -> str | None:
    current = library_versions()
    problems = [
        f"{name} {recorded.get(name, 'unknown')} (now {current[name]})"
        for name in _CHECKED_LIBRARIES
        if _major_minor(str(recorded.get(name, ""))) != _major_minor(current[name])
    ]
    return ", ".join(problems) if problems else None


def sequence_of_name(name: str) -> int | None:
    """The sequence in a checkpoint's file or object name (``ckpt-<sequence>.ckpt``)."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def quarantined_sequence(name: str) -> int | None:
    """The sequence kept in a quarantined checkpoint's name (never reused)."""
    match = _QUARANTINED_NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_name(sequence: int) -> str:
    """The file or object name of checkpoint ``sequence``."""
    return f"ckpt-{sequence:012d}.ckpt"


def _sequence_of(path: Path) -> int | None:
    return sequence_of_name(path.name)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


class CheckpointCodec:
    """The checkpoint format and its checks, shared by every store: manifests, signing,
    verification (never unpickling before the HMAC and sha256 verify) and loading.

    ``key`` None means unsigned mode, which needs ``allow_unsigned``. With a key, unsigned
    checkpoints are refused unless ``allow_unsigned`` (a migration aid, not for
    production). ``on_quarantine(location_in_quarantine, reason)`` is called for every
    quarantined checkpoint. ``location`` names the store in messages.
    """

    def __init__(
        self,
        location: str,
        key: bytes | None,
        allow_unsigned: bool,
        keep_last: int,
        on_quarantine: Callable[[Any, str], None] | None = None,
        crash: Callable[[str], None] | None = None,
    ) -> None:
        if key is None and not allow_unsigned:
            raise CheckpointError(
                f"no HMAC key for checkpoints in {location}: set "
                "STREAM_TRAINER_CHECKPOINT__HMAC_KEY (or checkpoint.hmac_key_file), or "
                "checkpoint.allow_unsigned: true (not for production)"
            )
        if key is not None and not key:
            raise CheckpointError("the checkpoint HMAC key is empty")
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self._key = key
        self._allow_unsigned = allow_unsigned
        self._keep_last = keep_last
        self._on_quarantine = on_quarantine
        self._crash = crash or (lambda _point: None)  # fault-injection tests only
        self._write_lock = threading.Lock()
        self._last_sequence: int | None = None  # scanned lazily: no I/O in the constructor

    def serialize(self, state: Any) -> bytes:
        """Pickle ``state`` (protocol 5).

        Call it on the thread that owns ``state``: the bytes are the consistent snapshot;
        the write itself may then run elsewhere (:class:`BackgroundWriter`).
        """
        return pickle.dumps(state, protocol=5)

    # ------------------------------------------------------------------ encoding

    def _manifest_fields(self, payload: bytes, given: dict[str, Any]) -> dict[str, Any]:
        unknown = set(given) - _CALLER_FIELDS - _OPTIONAL_CALLER_FIELDS
        missing = _CALLER_FIELDS - set(given)
        if unknown or missing:
            raise ValueError(
                f"manifest_fields: unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        fields: dict[str, Any] = {
            "created_at": time.time(),
            "library_versions": library_versions(),
            **given,
        }
        fields["offsets"] = {str(k): int(v) for k, v in given["offsets"].items()}
        fields["metrics"] = _finite(given["metrics"])
        fields["extra"] = _finite(given["extra"])
        fields.update(
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_size=len(payload),
            serializer=SERIALIZER,
            signed=self._key is not None,
        )
        return fields

    def _encode_header(self, fields: dict[str, Any]) -> bytes:
        manifest = self._signed_json(fields, _SIGNING_CONTEXT)
        return MAGIC + _LENGTH.pack(len(manifest)) + manifest

    def _signed_json(self, fields: dict[str, Any], context: bytes) -> bytes:
        """Canonical JSON of ``fields`` plus ``hmac`` (null in unsigned mode) over
        ``context`` + the canonical JSON; ``fields`` must hold ``signed``."""
        signature = sign(self._key, context + _canonical(fields)) if self._key else None
        return _canonical({**fields, "hmac": signature})

    # ------------------------------------------------------------------ verification

    def _verify_stream(
        self, file: BinaryIO, name: str, keep_payload: bool
    ) -> tuple[CheckpointManifest, bytes | None]:
        """Check format, signature, sequence (against ``name``) and payload checksum of the
        checkpoint read from ``file``; never unpickles.

        Raises _Rejected (quarantine), _PolicyRefusal (configuration) or OSError.
        """
        head = file.read(_HEADER_SIZE)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            if MAGIC.startswith(head):
                raise _Rejected(TRUNCATED, f"{len(head)} bytes, shorter than the header")
            raise _Rejected(BAD_MAGIC, "not a stream-trainer checkpoint (bad magic bytes)")
        if len(head) < _HEADER_SIZE:
            raise _Rejected(TRUNCATED, "file ends inside the header")
        (length,) = _LENGTH.unpack(head[len(MAGIC) :])
        if length > _MAX_MANIFEST_BYTES:
            raise _Rejected(BAD_MANIFEST, f"manifest length {length} is implausible")
        raw = file.read(length)
        if len(raw) < length:
            raise _Rejected(TRUNCATED, "file ends inside the manifest")
        fields = self._authenticated_fields(raw, _SIGNING_CONTEXT)
        manifest = self._manifest_from(fields)
        self._check_identity(manifest, name)
        digest = hashlib.sha256()
        chunks = bytearray() if keep_payload else None
        size = 0
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if chunks is not None:
                chunks += chunk
        if size < manifest.payload_size:
            raise _Rejected(TRUNCATED, f"payload has {size} of {manifest.payload_size} bytes")
        if size > manifest.payload_size:
            raise _Rejected(PAYLOAD_CHECKSUM, f"{size - manifest.payload_size} trailing bytes")
        if digest.hexdigest() != manifest.payload_sha256:
            raise _Rejected(PAYLOAD_CHECKSUM, "payload sha256 does not match the manifest")
        return manifest, (bytes(chunks) if chunks is not None else None)

    def _check_identity(self, manifest: CheckpointManifest, name: str) -> None:
        """Raise _Rejected when ``manifest`` does not belong under ``name``: a file copied
        or renamed over another one's name must not pass as it."""
        if manifest.sequence != sequence_of_name(name):
            raise _Rejected(
                SEQUENCE_MISMATCH,
                f"manifest sequence {manifest.sequence} does not match the file name",
            )

    def _authenticated_fields(self, raw: bytes, context: bytes) -> dict[str, Any]:
        """The JSON object in ``raw`` minus its ``hmac``, after checking the HMAC over
        ``context`` + its canonical JSON (or the unsigned policy). Raises _Rejected or
        _PolicyRefusal."""
        try:
            fields = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise _Rejected(BAD_MANIFEST, f"manifest is not JSON: {error}") from None
        if not isinstance(fields, dict) or "hmac" not in fields:
            raise _Rejected(BAD_MANIFEST, "manifest is not an object with an hmac field")
        signature = fields.pop("hmac")
        if signature is None:
            if not self._allow_unsigned:
                raise _PolicyRefusal(UNSIGNED_NOT_ALLOWED, "checkpoint is unsigned")
            if fields.get("signed") is not False:
                raise _Rejected(BAD_MANIFEST, "no hmac but the manifest says it is signed")
            return fields
        if not isinstance(signature, str):
            raise _Rejected(BAD_MANIFEST, "hmac field is not a string")
        if self._key is None:
            raise _PolicyRefusal(SIGNED_NO_KEY, "checkpoint is signed but no key is set")
        try:
            signed_bytes = _canonical(fields)
        except ValueError as error:
            raise _Rejected(BAD_MANIFEST, f"manifest is not canonical JSON: {error}") from None
        if not verify(self._key, context + signed_bytes, signature):
            raise _Rejected(
                BAD_SIGNATURE, "manifest HMAC does not verify (tampered, or another key)"
            )
        if fields.get("signed") is not True:
            raise _Rejected(BAD_MANIFEST, "hmac present but the manifest says unsigned")
        return fields

    @staticmethod
    def _manifest_from(fields: dict[str, Any]) -> CheckpointManifest:
        if not set(_FIELD_TYPES) <= set(fields) <= set(_FIELD_TYPES) | set(_OPTIONAL_FIELD_TYPES):
            raise _Rejected(BAD_MANIFEST, f"manifest fields are {sorted(fields)}")
        for name, types in {**_FIELD_TYPES, **_OPTIONAL_FIELD_TYPES}.items():
            if name not in fields:
                continue
            value = fields[name]
            # bool is an int subclass: only "signed" may be one.
            if not isinstance(value, types) or (isinstance(value, bool) and name != "signed"):
                raise _Rejected(BAD_MANIFEST, f"manifest field {name!r} has the wrong type")
        if not all(
            isinstance(v, int) and not isinstance(v, bool) for v in fields["offsets"].values()
        ):
            raise _Rejected(BAD_MANIFEST, "manifest offsets are not all integers")
        if fields["serializer"] != SERIALIZER:
            raise _Rejected(BAD_MANIFEST, f"unknown serializer {fields['serializer']!r}")
        return CheckpointManifest(**fields)

    def _refusal(self, location: object, refusal: _PolicyRefusal) -> CheckpointError:
        if refusal.reason == UNSIGNED_NOT_ALLOWED:
            return CheckpointError(
                f"checkpoint {location} is unsigned and unsigned checkpoints are not allowed; "
                "refusing to unpickle it. Set checkpoint.allow_unsigned: true to accept "
                "unsigned checkpoints (not for production), or move the file away."
            )
        return CheckpointError(
            f"checkpoint {location} is signed but no HMAC key is configured, so it cannot be "
            "verified and will not be unpickled; set STREAM_TRAINER_CHECKPOINT__HMAC_KEY "
            "(or checkpoint.hmac_key_file) to the key that signed it"
        )

    def _load_stream(
        self,
        file: BinaryIO,
        name: str,
        validate: Callable[[Any, CheckpointManifest], None] | None,
    ) -> tuple[CheckpointManifest, Any]:
        """Verify, then unpickle and validate; raises _Rejected for an unusable checkpoint."""
        manifest, payload = self._verify_stream(file, name, keep_payload=True)
        assert payload is not None
        mismatch = _library_mismatch(manifest.library_versions)
        if mismatch:
            raise _Rejected(LIBRARY_MISMATCH, f"written with {mismatch}")
        try:
            # The payload's sha256 is in the manifest, whose HMAC was verified above (or
            # unsigned mode was explicitly allowed): only authenticated bytes reach pickle.
            state = pickle.loads(payload)  # noqa: S301 - authenticated by _verify_stream
        except Exception as error:  # unpickling can raise anything; the file is unusable
            raise _Rejected(UNPICKLE_FAILED, f"{type(error).__name__}: {error}") from None
        if validate is not None:
            try:
                validate(state, manifest)
            except Exception as error:  # the caller's check: any failure means unusable
                raise _Rejected(VALIDATION_FAILED, f"{type(error).__name__}: {error}") from None
        return manifest, state

    def _inspect_stream(self, file: BinaryIO, name: str, result: dict[str, Any]) -> None:
        """Fill ``result`` (see ``inspect``) from the checkpoint in ``file``."""
        try:
            result["manifest"] = _read_manifest_json(file)
            file.seek(0)
            manifest, _ = self._verify_stream(file, name, keep_payload=False)
            mismatch = _library_mismatch(manifest.library_versions)
            if mismatch:
                raise _Rejected(LIBRARY_MISMATCH, f"written with {mismatch}")
        except _Rejected as rejected:
            result.update(verification=rejected.reason, detail=rejected.detail)


class CheckpointStore(CheckpointCodec):
    """Signed checkpoints in one directory: write atomically, load the newest good one.

    See :class:`CheckpointCodec` for ``key``, ``allow_unsigned`` and ``on_quarantine``
    (called with the quarantined file's path).
    """

    def __init__(
        self,
        directory: Path,
        key: bytes | None,
        allow_unsigned: bool,
        keep_last: int,
        on_quarantine: Callable[[Any, str], None] | None = None,
        crash: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(
            f"directory {directory}", key, allow_unsigned, keep_last, on_quarantine, crash
        )
        self.directory = Path(directory)

    @property
    def location(self) -> str:
        """Where the checkpoints are, for messages."""
        return str(self.directory)

    # ------------------------------------------------------------------ writing

    def write(self, payload: bytes, manifest_fields: dict[str, Any]) -> WriteResult[Path]:
        """Write ``payload`` durably as the next checkpoint, then prune to ``keep_last``.

        ``manifest_fields`` holds offsets, model_version, config_hash, records_learnt,
        metrics, extra (and optionally created_at, library_versions); the store assigns the
        sequence and the payload fields. Non-finite floats become null. On any OSError
        (disk full, EFBIG, EIO) the temp file is removed, previous checkpoints are left
        untouched and CheckpointError is raised.
        """
        started = time.monotonic()
        fields = self._manifest_fields(payload, manifest_fields)
        with self._write_lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            sequence = self._next_sequence()
            fields["sequence"] = sequence
            header = self._encode_header(fields)
            final = self.directory / checkpoint_name(sequence)
            temp = self.directory / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, header)
                    half = len(payload) // 2
                    _write_all(fd, memoryview(payload)[:half])
                    self._crash("mid_checkpoint_write")
                    _write_all(fd, memoryview(payload)[half:])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(temp, final)
                self._crash("after_rename")
            except OSError as error:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise CheckpointError(
                    f"checkpoint {final.name} could not be written in {self.directory}: "
                    f"{error}; previous checkpoints are untouched"
                ) from error
            # The sequence is used even if the directory fsync fails: the file exists.
            self._last_sequence = sequence
            try:
                _fsync_directory(self.directory)
            except OSError as error:
                raise CheckpointError(
                    f"checkpoint {final.name} was renamed but the directory fsync failed: {error}"
                ) from error
            self._prune(keep=final)
        return WriteResult(
            path=final,
            size_bytes=len(header) + len(payload),
            duration_s=time.monotonic() - started,
            sequence=sequence,
        )

    def _next_sequence(self) -> int:
        if self._last_sequence is None:
            found = [s for s in map(_sequence_of, self._all_files()) if s is not None]
            quarantine = self.directory / QUARANTINE_DIR
            if quarantine.is_dir():
                found += [
                    s
                    for s in map(quarantined_sequence, (p.name for p in quarantine.iterdir()))
                    if s is not None
                ]
            self._last_sequence = max(found, default=0)
        return self._last_sequence + 1

    def _prune(self, keep: Path) -> None:
        """Delete all but the newest ``keep_last``; ``keep`` (just written) always stays."""
        files = self.list()
        for old in files[: max(0, len(files) - self._keep_last)]:
            if old == keep:
                continue
            try:
                old.unlink()
            except OSError as error:  # pruning is housekeeping; the write succeeded
                log.warning("could not prune checkpoint %s: %s", old, error)

    # ------------------------------------------------------------------ reading

    def _all_files(self) -> list[Path]:
        try:
            return list(self.directory.iterdir())
        except FileNotFoundError:
            return []

    def list(self) -> list[Path]:
        """Checkpoint files, oldest first (temp files and the quarantine are ignored)."""
        numbered = [(s, p) for p in self._all_files() if (s := _sequence_of(p)) is not None]
        return [p for _, p in sorted(numbered)]

    def remove_temp_files(self) -> int:
        """Delete leftover temp files of crashed writes; writer only (hold the lock)."""
        removed = 0
        for path in self._all_files():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def _verify(self, path: Path, keep_payload: bool) -> tuple[CheckpointManifest, bytes | None]:
        with path.open("rb") as file:
            return self._verify_stream(file, path.name, keep_payload)

    def load_latest(
        self, validate: Callable[[Any, CheckpointManifest], None] | None = None
    ) -> LoadedCheckpoint[Path] | None:
        """The newest checkpoint that verifies, unpickles and validates, or None.

        Writer only (hold the lock): removes temp files and quarantines every newer file
        that fails (calling ``on_quarantine``) before trying the previous one. Nothing is
        unpickled before its manifest HMAC and payload sha256 verify. Raises
        CheckpointError when the configuration forbids loading a file (unsigned without
        ``allow_unsigned``, signed without a key) or on an I/O error.
        """
        self.remove_temp_files()
        for path in reversed(self.list()):
            try:
                loaded = self._load(path, validate)
            except _PolicyRefusal as refusal:
                raise self._refusal(path, refusal) from None
            except _Rejected as rejected:
                self._quarantine(path, rejected.reason, rejected.detail)
                continue
            except OSError as error:
                raise CheckpointError(f"checkpoint {path} could not be read: {error}") from error
            log.info("checkpoint %s loaded (sequence %d)", path, loaded.manifest.sequence)
            return loaded
        return None

    def read_latest(self) -> LoadedCheckpoint[Path] | None:
        """The newest checkpoint that verifies and unpickles, or None; read-only (for a
        reader beside a running service: nothing is removed or quarantined, a failing file
        is skipped). Raises CheckpointError as :meth:`load_latest` does on policy refusals."""
        for path in reversed(self.list()):
            try:
                return self._load(path, None)
            except _PolicyRefusal as refusal:
                raise self._refusal(path, refusal) from None
            except (_Rejected, OSError):
                continue  # being replaced, or damaged: the writer will deal with it
        return None

    def _load(
        self, path: Path, validate: Callable[[Any, CheckpointManifest], None] | None
    ) -> LoadedCheckpoint[Path]:
        with path.open("rb") as file:
            manifest, state = self._load_stream(file, path.name, validate)
        return LoadedCheckpoint(manifest=manifest, state=state, path=path)

    def _quarantine(self, path: Path, reason: str, detail: str) -> Path:
        """Move ``path`` to <dir>/quarantine/<name>.<reason>, with a .reason sidecar."""
        quarantine = self.directory / QUARANTINE_DIR
        try:
            quarantine.mkdir(exist_ok=True)
            target = quarantine / f"{path.name}.{reason}"
            suffix = 1
            while target.exists():
                target = quarantine / f"{path.name}.{reason}.{suffix}"
                suffix += 1
            target.with_name(target.name + ".reason").write_text(
                f"{reason}: {detail}\n", encoding="utf-8"
            )
            os.replace(path, target)
            _fsync_directory(quarantine)
            _fsync_directory(self.directory)
        except OSError as error:
            raise CheckpointError(
                f"checkpoint {path} failed verification ({reason}: {detail}) and could not "
                f"be quarantined: {error}"
            ) from error
        log.warning("checkpoint %s quarantined as %s: %s", path.name, reason, detail)
        if self._on_quarantine is not None:
            self._on_quarantine(target, reason)
        return target

    def inspect(self, path: Path) -> dict[str, Any]:
        """Manifest and verification result, never unpickling.

        ``verification`` is "ok" or the reason ``load_latest`` would act on (a quarantine
        reason, or unsigned_not_allowed / signed_but_no_key); ``manifest`` is the parsed
        JSON (unauthenticated unless verification is "ok"); the HMAC is left out.
        """
        path = Path(path)
        result: dict[str, Any] = {"path": str(path), "verification": "ok", "detail": ""}
        try:
            result["size_bytes"] = path.stat().st_size
            with path.open("rb") as file:
                self._inspect_stream(file, path.name, result)
        except OSError as error:
            result.update(verification="unreadable", detail=str(error))
        return result

    def latest_manifest(self) -> CheckpointManifest | None:
        """The newest manifest whose HMAC and payload checksum verify; read-only.

        Library versions are not checked here (see ``inspect``); nothing is quarantined.
        """
        for path in reversed(self.list()):
            try:
                manifest, _ = self._verify(path, keep_payload=False)
            except (_Rejected, OSError):
                continue
            return manifest
        return None


def _read_manifest_json(file: BinaryIO) -> dict[str, Any] | None:
    """The manifest JSON as stored (minus the hmac), or None if unreadable; no checks."""
    head = file.read(_HEADER_SIZE)
    if len(head) < _HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
        return None
    (length,) = _LENGTH.unpack(head[len(MAGIC) :])
    if length > _MAX_MANIFEST_BYTES:
        return None
    try:
        fields = json.loads(file.read(length))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(fields, dict):
        return None
    fields.pop("hmac", None)
    return fields


class DirectoryLock:
    """One writer per checkpoint directory: ``flock(LOCK_EX | LOCK_NB)`` on <dir>/.lock.

    ``acquire`` never waits: if another process (or another DirectoryLock in this one)
    holds it, CheckpointLocked names the holder's pid. The kernel releases the lock when
    the process dies, so a kill -9 never leaves a stale lock. The file is never deleted
    (deleting lock files races with a concurrent acquire).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise CheckpointLocked immediately."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this DirectoryLock")
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointLocked(
                    f"checkpoint directory {self.directory} is locked by pid {holder}; "
                    "another stream-trainer is running on it"
                ) from None
            raise CheckpointError(f"could not lock {self.path}: {error}") from error
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _Writes(Protocol):
    def write(self, payload: bytes, manifest_fields: dict[str, Any]) -> WriteResult[Any]: ...


class CheckpointWriter(_Writes, Protocol):
    """What the poll loop needs of a checkpoint store (a folder's or an object store's)."""

    def serialize(self, state: Any) -> bytes: ...


class BackgroundWriter:
    """Writes checkpoints on one worker thread so a large one never stalls the poll loop.

    At most one write is in flight: ``submit`` while busy returns None and the caller
    skips that checkpoint (the next one covers more offsets, so nothing is lost). The
    future resolves to the WriteResult or raises the CheckpointError. Offsets may be
    committed only after the future has resolved successfully.
    """

    def __init__(self, store: _Writes) -> None:
        self._store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="checkpoint-writer"
        )
        self._in_flight: concurrent.futures.Future[WriteResult[Any]] | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def busy(self) -> bool:
        """True while a write is in flight."""
        with self._lock:
            return self._in_flight is not None and not self._in_flight.done()

    def submit(
        self, payload: bytes, manifest_fields: dict[str, Any]
    ) -> concurrent.futures.Future[WriteResult[Any]] | None:
        """Start writing ``payload``; None if a write is already in flight.

        ``payload`` must already be serialized (``CheckpointStore.serialize`` on the
        owning thread). Raises RuntimeError after ``close``.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("BackgroundWriter is closed")
            if self._in_flight is not None and not self._in_flight.done():
                return None
            self._in_flight = self._executor.submit(self._store.write, payload, manifest_fields)
            return self._in_flight

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting writes; wait up to ``timeout`` for the one in flight.

        Returns True when no write is left running.
        """
        with self._lock:
            self._closed = True
            in_flight = self._in_flight
        self._executor.shutdown(wait=False)
        if in_flight is None:
            return True
        done, _ = concurrent.futures.wait([in_flight], timeout=timeout)
        return bool(done)
