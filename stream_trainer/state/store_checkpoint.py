"""Checkpoints on an object store (``checkpoint.dir: s3://bucket/prefix``): the same format,
signing and checks as :mod:`stream_trainer.state.checkpoint`, without rename or fsync.

Layout under the prefix::

    ckpt-<sequence:012d>.ckpt        the checkpoints (same bytes as on disk), create-only
    LATEST                           the pointer: {"sequence", "object", "token"}
    LEASE                            the writer's lease (stream_trainer.state.store_lease)
    quarantine/<name>.<reason>       checkpoints that failed verification (+ ``.reason``)

A write uploads the checkpoint create-only (``If-None-Match``: a sequence is never
overwritten), then moves ``LATEST`` to it by compare-and-swap on the ETag this writer last
saw. That one conditional write makes the checkpoint the newest; a crash before it leaves
the previous one the newest (the upload is an orphan, deleted at the next start).

Fencing: only the holder of the lease object writes. A writer that restores takes the
pointer over at once (a CAS write carrying its lease token), so a stale writer that paused
past its lease can neither move the pointer (its ETag is old) nor upload a sequence the new
writer uses (create-only): its writes raise :class:`CheckpointFenced` and it commits
nothing. Each checkpoint's manifest carries the writer's token in ``extra.writer_token``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stream_trainer.state.checkpoint import (
    QUARANTINE_DIR,
    CheckpointCodec,
    CheckpointError,
    CheckpointFenced,
    CheckpointManifest,
    LoadedCheckpoint,
    WriteResult,
    _PolicyRefusal,
    _Rejected,
    checkpoint_name,
    quarantined_sequence,
    sequence_of_name,
)
from stream_trainer.state.objectstore import (
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    PreconditionFailed,
)
from stream_trainer.state.store_lease import LeaseLost, StoreLease, StoreLeaseError

log = logging.getLogger(__name__)

POINTER = "LATEST"
LEASE = "LEASE"


@dataclass(frozen=True)
class Pointer:
    """``LATEST``: the newest visible checkpoint and the token of the writer that set it."""

    sequence: int
    token: int | None

    @classmethod
    def parse(cls, data: bytes) -> Pointer:
        try:
            raw: dict[str, Any] = json.loads(data)
            token = raw.get("token")
            return cls(int(raw["sequence"]), int(token) if token is not None else None)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"unreadable {POINTER} pointer: {error}") from None

    def encode(self) -> bytes:
        name = checkpoint_name(self.sequence) if self.sequence else None
        return json.dumps(
            {"sequence": self.sequence, "object": name, "token": self.token}, sort_keys=True
        ).encode()


class CheckpointMissing(CheckpointError):
    """A checkpoint object that should be there is not (deleted or quarantined meanwhile)."""


class ObjectCodec(CheckpointCodec):
    """What every checkpoint store on an object store shares: fetching, loading (verified
    before unpickling), quarantining by copy + delete, inspecting. Object names are keys
    relative to ``store``; a quarantined ``<name>`` goes to ``quarantine/<name>.<reason>``
    (so ``partition/t/0/ckpt-….ckpt`` to ``quarantine/partition/t/0/ckpt-….ckpt.<reason>``).
    """

    store: ObjectStore  # set by the subclass's constructor

    def _list(self, prefix: str) -> list[ObjectInfo]:
        try:
            return self.store.list(prefix)
        except ObjectStoreError as error:
            raise CheckpointError(f"checkpoints could not be listed: {error}") from error

    def _fetch(self, name: str) -> bytes:
        try:
            return self.store.get(name).data
        except ObjectNotFound as error:
            raise CheckpointMissing(f"checkpoint {self.store.url_of(name)}: {error}") from error
        except ObjectStoreError as error:
            raise CheckpointError(f"checkpoint {self.store.url_of(name)}: {error}") from error

    def _load(
        self, name: str, validate: Callable[[Any, CheckpointManifest], None] | None
    ) -> LoadedCheckpoint[str]:
        manifest, state = self._load_stream(io.BytesIO(self._fetch(name)), name, validate)
        return LoadedCheckpoint(manifest=manifest, state=state, path=self.store.url_of(name))

    def _object_name(self, sequence: int) -> str:
        """The key of checkpoint ``sequence``."""
        raise NotImplementedError

    def _next_sequence(self) -> int:
        """The sequence the next upload tries."""
        raise NotImplementedError

    def _sequence_taken(self, sequence: int) -> None:
        """Called when the upload of ``sequence`` found its key taken, before the next try."""

    def _upload(self, payload: bytes, fields: dict[str, Any]) -> tuple[int, bytes]:
        """Upload the checkpoint create-only under the next free sequence; returns it and
        the header. A key found taken (an upload whose answer was lost, or one of a writer
        this one fenced) is never overwritten: the next sequence is tried."""
        for _ in range(3):
            sequence = self._next_sequence()
            # Used from here on even if the upload fails: its answer may have been lost.
            self._last_sequence = sequence
            fields["sequence"] = sequence
            header = self._encode_header(fields)
            name = self._object_name(sequence)
            self._crash("mid_checkpoint_write")
            try:
                self.store.put_if_absent(name, header + payload)
            except ObjectExists:
                log.warning("checkpoint %s exists already; trying the next sequence", name)
                self._sequence_taken(sequence)
                continue
            except ObjectStoreError as error:
                raise CheckpointError(
                    f"checkpoint {name} could not be uploaded: {error}; previous checkpoints "
                    "are untouched"
                ) from error
            return sequence, header
        raise CheckpointError(
            f"checkpoint sequences under {self.store.url} keep being taken: another writer "
            "is on them"
        )

    def _load_first(
        self,
        names: list[str],
        validate: Callable[[Any, CheckpointManifest], None] | None,
        skip_missing: bool = False,
    ) -> tuple[LoadedCheckpoint[str] | None, list[str]]:
        """The first of ``names`` that verifies, unpickles and validates (or None), and the
        names passed over: each failing one quarantined first, a missing one skipped when
        ``skip_missing`` (else CheckpointMissing). Raises CheckpointError on a policy
        refusal (the configuration, not the object, is wrong) or a store error."""
        passed: list[str] = []
        for name in names:
            try:
                loaded = self._load(name, validate)
            except _PolicyRefusal as refusal:
                raise self._refusal(self.store.url_of(name), refusal) from None
            except _Rejected as rejected:
                self._quarantine(name, rejected.reason, rejected.detail)
                passed.append(name)
                continue
            except CheckpointMissing:
                if not skip_missing:
                    raise
                log.warning("checkpoint %s is gone; trying the previous one", name)
                passed.append(name)
                continue
            log.info("checkpoint %s loaded (sequence %d)", loaded.path, loaded.manifest.sequence)
            return loaded, passed
        return None, passed

    def _quarantine(self, name: str, reason: str, detail: str) -> str:
        """Copy ``name`` to quarantine/<name>.<reason> (+ a .reason object), then delete it."""
        try:
            data = self.store.get(name).data
            suffix = 0
            while True:
                target = f"{QUARANTINE_DIR}/{name}.{reason}" + (f".{suffix}" if suffix else "")
                try:
                    self.store.put_if_absent(target, data)
                    break
                except ObjectExists:
                    suffix += 1
            self.store.put(f"{target}.reason", f"{reason}: {detail}\n".encode())
            self.store.delete(name)
        except ObjectStoreError as error:
            raise CheckpointError(
                f"checkpoint {self.store.url_of(name)} failed verification ({reason}: "
                f"{detail}) and could not be quarantined: {error}"
            ) from error
        location = self.store.url_of(target)
        log.warning("checkpoint %s quarantined as %s: %s", name, reason, detail)
        if self._on_quarantine is not None:
            self._on_quarantine(location, reason)
        return location

    def inspect(self, name: str) -> dict[str, Any]:
        """As :meth:`CheckpointStore.inspect`, for the object ``name`` under the prefix."""
        result: dict[str, Any] = {
            "path": self.store.url_of(name),
            "verification": "ok",
            "detail": "",
        }
        try:
            data = self.store.get(name).data
        except ObjectStoreError as error:
            result.update(verification="unreadable", detail=str(error))
            return result
        result["size_bytes"] = len(data)
        self._inspect_stream(io.BytesIO(data), name, result)
        return result


class ObjectCheckpointStore(ObjectCodec):
    """Signed checkpoints under one object-store prefix; the interface of
    :class:`stream_trainer.state.checkpoint.CheckpointStore`, locations being URLs.

    ``lease`` (the writer's, already acquired) is renewed by every write and its token
    fences the pointer; without one (tests, read-only use) the pointer's CAS alone guards.
    Mutating calls (``write``, ``load_latest``) belong to the lease holder; ``list``,
    ``read_latest``, ``latest_manifest`` and ``inspect`` are read-only.
    """

    def __init__(
        self,
        store: ObjectStore,
        key: bytes | None,
        allow_unsigned: bool,
        keep_last: int,
        on_quarantine: Callable[[Any, str], None] | None = None,
        crash: Callable[[str], None] | None = None,
        lease: StoreLease | None = None,
    ) -> None:
        super().__init__(store.url, key, allow_unsigned, keep_last, on_quarantine, crash)
        self.store = store
        self.lease = lease
        self._pointer_etag: str | None = None  # the pointer's ETag as this writer left it
        self._pointer_known = False  # False until read (None ETag: no pointer yet)

    def __repr__(self) -> str:
        return f"ObjectCheckpointStore({self.store.url!r})"

    @property
    def location(self) -> str:
        """Where the checkpoints are, for messages."""
        return self.store.url

    def _token(self) -> int | None:
        return self.lease.token if self.lease is not None else None

    # ------------------------------------------------------------------ the pointer

    def _read_pointer(self) -> tuple[Pointer, str] | None:
        try:
            found = self.store.get(POINTER)
        except ObjectNotFound:
            return None
        except ObjectStoreError as error:
            raise CheckpointError(f"checkpoint pointer unreadable: {error}") from error
        return Pointer.parse(found.data), found.etag

    def _move_pointer(self, sequence: int) -> None:
        """Make ``sequence`` the newest by CAS on the ETag this writer last saw; raises
        CheckpointFenced when another writer (another token) moved it meanwhile.

        A CAS whose answer was lost (a timeout) may have been applied: the pointer then
        carries this writer's own token, so its ETag is adopted and the CAS tried again,
        rather than this writer fencing itself off."""
        token = self._token()
        body = Pointer(sequence, token).encode()
        for _ in range(3):
            if not self._pointer_known:
                current = self._read_pointer()
                self._check_not_newer(current, token)
                self._pointer_etag = current[1] if current else None
                self._pointer_known = True
            try:
                if self._pointer_etag is None:
                    self._pointer_etag = self.store.put_if_absent(POINTER, body)
                else:
                    self._pointer_etag = self.store.put_if_match(POINTER, body, self._pointer_etag)
                return
            except (PreconditionFailed, ObjectExists):
                pass
            except ObjectStoreError as error:
                self._pointer_known = False  # the write may have been applied: read it again
                raise CheckpointError(
                    f"checkpoint {checkpoint_name(sequence)} uploaded but {POINTER} could not "
                    f"be moved to it: {error}; the previous checkpoint stays the newest"
                ) from error
            current = self._read_pointer()
            if current is not None and current[0] == Pointer(sequence, token):
                self._pointer_etag = current[1]
                return
            if token is None or current is None or current[0].token != token:
                found = (
                    f"sequence {current[0].sequence}, token {current[0].token}"
                    if current
                    else "none"
                )
                raise CheckpointFenced(
                    f"{self.store.url_of(POINTER)} was moved by another writer ({found}); this "
                    f"writer (token {token}) stops writing checkpoints"
                )
            self._pointer_known = False  # our own earlier write: adopt its ETag, try again
        raise CheckpointError(f"{self.store.url_of(POINTER)} kept changing under this writer")

    def _check_not_newer(self, current: tuple[Pointer, str] | None, token: int | None) -> None:
        stored = current[0].token if current else None
        if stored is not None and token is not None and stored > token:
            raise CheckpointFenced(
                f"{self.store.url_of(POINTER)} carries token {stored}, newer than this "
                f"writer's {token}"
            )

    def _claim_pointer(self, pointer: tuple[Pointer, str] | None, sequence: int) -> bool:
        """Point the pointer read at restore to ``sequence`` (the checkpoint restored, 0
        for none) with this writer's token, so any older writer's next CAS fails; False if
        it moved since it was read (restore again)."""
        self._pointer_etag = pointer[1] if pointer else None
        self._pointer_known = True
        self._check_not_newer(pointer, self._token())
        try:
            self._move_pointer(sequence)
        except CheckpointFenced:
            self._pointer_known = False
            return False
        return True

    # ------------------------------------------------------------------ writing

    def _renew_lease(self) -> None:
        if self.lease is None:
            return
        try:
            self.lease.renew()
        except LeaseLost as error:
            raise CheckpointFenced(f"checkpoint lease lost: {error}") from None
        except StoreLeaseError as error:  # the store, not a takeover: the next write retries
            raise CheckpointError(f"checkpoint lease could not be renewed: {error}") from None

    def write(self, payload: bytes, manifest_fields: dict[str, Any]) -> WriteResult[str]:
        """Upload ``payload`` as the next checkpoint, make it the newest, then prune to
        ``keep_last`` (see :meth:`CheckpointStore.write` for ``manifest_fields``).

        Raises CheckpointFenced when another writer took over (lease or pointer), and
        CheckpointError for a store error; either way the previous checkpoint stays the
        newest and the caller must not commit."""
        started = time.monotonic()
        given = dict(manifest_fields)
        token = self._token()
        if token is not None:
            given["extra"] = {**given.get("extra", {}), "writer_token": token}
        fields = self._manifest_fields(payload, given)
        with self._write_lock:
            self._renew_lease()
            sequence, header = self._upload(payload, fields)
            name = checkpoint_name(sequence)
            self._crash("before_checkpoint_visible")
            self._move_pointer(sequence)
            self._crash("after_rename")
            self._prune(keep=sequence)
        return WriteResult(
            path=self.store.url_of(name),
            size_bytes=len(header) + len(payload),
            duration_s=time.monotonic() - started,
            sequence=sequence,
        )

    def _object_name(self, sequence: int) -> str:
        return checkpoint_name(sequence)

    def _sequence_taken(self, sequence: int) -> None:
        """An upload of a writer this one fenced, made after the scan: rescan."""
        self._last_sequence = None

    def _next_sequence(self) -> int:
        if self._last_sequence is None:
            found = [sequence for sequence, _ in self._listed()]
            found += [
                s
                for s in (
                    quarantined_sequence(info.key.rsplit("/", 1)[-1])
                    for info in self._list(f"{QUARANTINE_DIR}/")
                )
                if s is not None
            ]
            pointer = self._read_pointer()
            if pointer is not None:
                found.append(pointer[0].sequence)
            self._last_sequence = max(found, default=0)
        return self._last_sequence + 1

    def _prune(self, keep: int) -> None:
        """Delete all but the newest ``keep_last`` up to ``keep``; housekeeping only."""
        try:
            listed = [s for s, _ in self._listed() if s <= keep]
        except CheckpointError as error:
            log.warning("could not list checkpoints to prune: %s", error)
            return
        for sequence in listed[: max(0, len(listed) - self._keep_last)]:
            try:
                self.store.delete(checkpoint_name(sequence))
            except ObjectStoreError as error:
                log.warning("could not prune checkpoint %d: %s", sequence, error)

    # ------------------------------------------------------------------ reading

    def _listed(self) -> list[tuple[int, str]]:
        """(sequence, name) of every checkpoint object at the top level, oldest first."""
        found = []
        # The whole prefix, filtered: object stores match list prefixes by path segment.
        for info in self._list(""):
            sequence = sequence_of_name(info.key)
            if sequence is not None:
                found.append((sequence, info.key))
        return sorted(found)

    def _candidates(
        self, pointer: tuple[Pointer, str] | None, listed: list[tuple[int, str]] | None = None
    ) -> list[tuple[int, str]]:
        """Visible checkpoints, newest first: those up to the pointer's sequence (every
        listed one when there is no pointer: a store written before it, or by hand);
        ``listed``: :meth:`_listed` when the caller has it already."""
        listed = self._listed() if listed is None else listed
        if pointer is None:
            return listed[::-1]
        return [(s, n) for s, n in listed if s <= pointer[0].sequence][::-1]

    def remove_temp_files(self) -> int:
        """Delete uploads above the pointer (crashed before becoming visible); writer only."""
        return self._delete_invisible(self._read_pointer(), self._listed())

    def _delete_invisible(
        self, pointer: tuple[Pointer, str] | None, listed: list[tuple[int, str]]
    ) -> int:
        if pointer is None:
            return 0
        removed = 0
        for sequence, name in listed:
            if sequence > pointer[0].sequence:
                try:
                    self.store.delete(name)
                    removed += 1
                except ObjectStoreError as error:
                    log.warning("could not delete invisible checkpoint %s: %s", name, error)
        return removed

    def load_latest(
        self, validate: Callable[[Any, CheckpointManifest], None] | None = None
    ) -> LoadedCheckpoint[str] | None:
        """The newest visible checkpoint that verifies, unpickles and validates, or None;
        then the pointer is claimed for this writer (see the module docstring).

        Writer only (hold the lease): deletes invisible uploads and quarantines every
        newer checkpoint that fails before trying the previous one. Raises CheckpointError
        on a policy refusal (as on disk) or a store error, CheckpointFenced when a newer
        writer holds the pointer."""
        for _ in range(5):
            pointer = self._read_pointer()
            loaded = self._load_newest(pointer, validate)
            if self._claim_pointer(pointer, loaded.manifest.sequence if loaded else 0):
                self._last_sequence = None  # rescanned at the first write
                return loaded
            log.warning("checkpoint pointer moved during restore; restoring again")
        raise CheckpointFenced(f"{self.store.url_of(POINTER)} kept moving: another writer is on it")

    def _load_newest(
        self,
        pointer: tuple[Pointer, str] | None,
        validate: Callable[[Any, CheckpointManifest], None] | None,
    ) -> LoadedCheckpoint[str] | None:
        listed = self._listed()  # one LIST for both
        self._delete_invisible(pointer, listed)
        loaded, _ = self._load_first(
            [name for _, name in self._candidates(pointer, listed)], validate
        )
        return loaded

    def read_latest(self) -> LoadedCheckpoint[str] | None:
        """The newest visible checkpoint that verifies and unpickles, or None; read-only
        (nothing deleted or quarantined, a failing one skipped). Raises CheckpointError on
        policy refusals and store errors."""
        for _, name in self._candidates(self._read_pointer()):
            try:
                return self._load(name, None)
            except _PolicyRefusal as refusal:
                raise self._refusal(self.store.url_of(name), refusal) from None
            except _Rejected:
                continue
        return None

    def names(self, include_all: bool) -> list[str]:
        """Names of the newest visible checkpoint (or of all of them), oldest first."""
        candidates = [name for _, name in self._candidates(self._read_pointer())][::-1]
        return candidates if include_all else candidates[-1:]

    def latest_manifest(self) -> CheckpointManifest | None:
        """The newest visible manifest whose HMAC and checksum verify; read-only."""
        for _, name in self._candidates(self._read_pointer()):
            try:
                manifest, _ = self._verify_stream(
                    io.BytesIO(self._fetch(name)), name, keep_payload=False
                )
            except (_Rejected, CheckpointError):
                continue
            return manifest
        return None

    def list(self) -> list[str]:
        """URLs of the visible checkpoints (up to the pointer), oldest first."""
        pointer = self._read_pointer()
        return [self.store.url_of(name) for sequence, name in self._candidates(pointer)][::-1]
