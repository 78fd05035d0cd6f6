"""The model registry on an object store (``registry.root: s3://bucket/prefix``).

Same contracts as the local :class:`stream_trainer.publishing.registry.ModelRegistry`, without
rename
or fsync. Layout under ``<base>/<model_name>/``::

    versions/<version:08d>/model.pkl       the artifact, uploaded first (create-only)
    versions/<version:08d>/metadata.json   lineage + artifact_sha256 (+ artifact_hmac);
                                           written LAST with If-None-Match: the version
                                           exists exactly when this object does
    HIGH_WATER_MARK                        {"version": n}, moved by compare-and-swap
    CHAMPION                               {"version": n, "since": ts, "reason": ...}
    decisions/<ts>-<id>.json               one object per decision (stores cannot append)
    rejected/<candidate-id>.json           rejected candidates with both scores
    events-sent/<version:08d>              marker: the version event was delivered

Contracts:

- Never half-visible: readers list ``metadata.json`` objects only, and that object is
  written after the artifact is complete. A crash between the two leaves an artifact no
  listing shows; its number is never reused (the high-water mark moved first).
- Never overwritten: both writes are create-only, so a second publish of a number (two
  writers, or a replay) is refused with RegistryError and changes nothing.
- Version numbers come from a compare-and-swap on ``HIGH_WATER_MARK``: two writers racing
  get different numbers.
- Fencing: a writer given a :class:`Fence` (a :class:`stream_trainer.state.store_lease.StoreLease`,
  or a slot's claim, :class:`stream_trainer.state.slot_fence.SlotFence`) stamps its
  token into ``HIGH_WATER_MARK``, ``CHAMPION`` and each version's metadata
  (``writer_token``), and is refused when either object carries a higher token: a stale
  writer whose lease was taken over can neither reserve a number nor move the champion
  (:class:`stream_trainer.publishing.registry.RegistryFenced`). It re-checks the fence just before
  the visibility write. Manual promote / rollback
  (no lease) keep the stored token.
- Reading needs only GET and LIST on the prefix.
- Retention deletes ``metadata.json`` first (the version disappears at once), then the rest.
"""

from __future__ import annotations

import builtins
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from stream_trainer.publishing.registry import (
    ARTIFACT_FILE,
    METADATA_FILE,
    RegistryError,
    RegistryFenced,
    RegistryUnavailable,
    VersionInfo,
    _now,
    json_safe,
    rollback_target,
    verify_artifact,
)
from stream_trainer.publishing.signing import sha256_hex, sign
from stream_trainer.state.objectstore import (
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    PreconditionFailed,
)
from stream_trainer.state.store_lease import LeaseLost, StoreLeaseError

_VERSION_KEY = re.compile(r"/versions/(\d{8})/" + re.escape(METADATA_FILE) + "$")
_RESERVE_ATTEMPTS = 20


class Fence(Protocol):
    """What a writer's ownership must answer (:class:`stream_trainer.state.store_lease.StoreLease`
    does): ``token`` (None until held), ``check()`` the token after confirming the
    ownership is still this writer's, ``renew()`` before a publish. Both raise
    :class:`stream_trainer.state.store_lease.LeaseLost` once another writer took over (the
    registry refuses: RegistryFenced) and another StoreLeaseError when the store cannot
    tell (RegistryUnavailable)."""

    @property
    def token(self) -> int | None: ...

    def check(self) -> int: ...

    def renew(self) -> None: ...


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, indent=2, allow_nan=False).encode()


class StoreRegistry:
    """Versions of one model under ``<store>/<model_name>/``; see the module docstring.

    Every store failure surfaces as RegistryError naming the object.
    """

    def __init__(
        self,
        store: ObjectStore,
        model_name: str,
        key: bytes | None,
        keep_last: int,
        lease: Fence | None = None,
        crash: Callable[[str], None] | None = None,
        folder: str | None = None,
    ):
        """``folder``: the key prefix of the versions (default ``model_name``; a scoped
        model's slot passes ``scoped_versions.scope_prefix(...)``); ``model_name`` is
        what metadata and rejection records name."""
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.store = store
        self.lease = lease
        self.crash = crash or (lambda _point: None)
        self.model_name = model_name
        self._key = key
        self._keep_last = keep_last
        self._base = folder or model_name

    def __repr__(self) -> str:
        return f"StoreRegistry({self.store!r}, {self.model_name!r})"

    # -- keys --------------------------------------------------------------------------

    def _version_prefix(self, version: int) -> str:
        return f"{self._base}/versions/{version:08d}"

    def _read(self, key: str) -> bytes | None:
        try:
            return self.store.get(key).data
        except ObjectNotFound:
            return None
        except ObjectStoreError as error:
            raise RegistryUnavailable(str(error)) from error

    def _read_json(self, key: str) -> Any:
        data = self._read(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as error:
            raise RegistryError(f"{self.store.url_of(key)}: unreadable: {error}") from error

    # -- reading -----------------------------------------------------------------------

    def _numbers(self) -> builtins.list[int]:
        try:
            listed = self.store.list(f"{self._base}/versions/")
        except ObjectStoreError as error:
            raise RegistryUnavailable(str(error)) from error
        found = (_VERSION_KEY.search("/" + info.key) for info in listed)
        return sorted(int(match.group(1)) for match in found if match)

    def _info(self, version: int, metadata: dict[str, Any]) -> VersionInfo:
        prefix = self._version_prefix(version)
        return VersionInfo(
            version=version, path=Path(prefix), metadata=metadata, url=self.store.url_of(prefix)
        )

    def list(self) -> builtins.list[VersionInfo]:
        """Every published version, oldest first (one LIST, one GET per version)."""
        infos = []
        for number in self._numbers():
            # A version deleted by retention between the LIST and the GET is skipped.
            metadata = self._read_json(f"{self._version_prefix(number)}/{METADATA_FILE}")
            if isinstance(metadata, dict):
                infos.append(self._info(number, metadata))
        return infos

    def get(self, version: int) -> VersionInfo:
        """The version ``version``; raises RegistryError when it does not exist."""
        metadata = self._read_json(f"{self._version_prefix(version)}/{METADATA_FILE}")
        if not isinstance(metadata, dict):
            raise RegistryError(f"{self.model_name}: no version {version}")
        return self._info(version, metadata)

    def _champion_pointer(self) -> dict[str, Any] | None:
        pointer = self._read_json(f"{self._base}/CHAMPION")
        return pointer if isinstance(pointer, dict) else None

    def champion(self) -> VersionInfo | None:
        """The current champion, or None when none was promoted (or it is gone)."""
        pointer = self._champion_pointer()
        if pointer is None:
            return None
        try:
            return self.get(int(pointer["version"]))
        except RegistryError:
            return None

    def decisions(self) -> builtins.list[dict[str, Any]]:
        """The decisions, oldest first (their keys sort by time)."""
        try:
            listed = self.store.list(f"{self._base}/decisions/")
        except ObjectStoreError as error:
            raise RegistryUnavailable(str(error)) from error
        entries = []
        for info in listed:
            entry = self._read_json(info.key)
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def load_artifact(self, version: int) -> bytes:
        """The artifact bytes of ``version``, verified (sha256, and HMAC under a key)
        before they are returned; raises RegistryError on any mismatch."""
        info = self.get(version)
        name = str(info.metadata.get("artifact_file", ARTIFACT_FILE))
        artifact = self._read(f"{self._version_prefix(version)}/{name}")
        if artifact is None:
            raise RegistryError(f"{self.model_name} version {version}: artifact missing")
        try:
            verify_artifact(
                artifact,
                info.metadata.get("artifact_sha256"),
                info.metadata.get("artifact_hmac"),
                self._key,
            )
        except RegistryError as error:
            raise RegistryError(f"{self.model_name} version {version}: {error}") from None
        return artifact

    def event_sent(self, info: VersionInfo) -> bool:
        """True once the version event of ``info`` was delivered."""
        return self._read(f"{self._base}/events-sent/{info.version:08d}") is not None

    def mark_event_sent(self, info: VersionInfo) -> None:
        """Record that the version event of ``info`` was delivered."""
        self._write(f"{self._base}/events-sent/{info.version:08d}", b"")

    # -- writing -----------------------------------------------------------------------

    def _write(self, key: str, data: bytes) -> None:
        try:
            self.store.put(key, data)
        except ObjectStoreError as error:
            raise RegistryUnavailable(str(error)) from error

    def next_version(self) -> int:
        """The number the next published version gets: above every version that exists
        and every number ever reserved."""
        numbers = self._numbers()
        mark = self._read_json(f"{self._base}/HIGH_WATER_MARK")
        reserved = int(mark["version"]) if isinstance(mark, dict) else 0
        return max(numbers[-1] if numbers else 0, reserved) + 1

    def _fence(self, stored: Any, what: str) -> int | None:
        """The token to write over ``stored`` (an object's JSON): ours under a lease, after
        checking ``stored`` holds no newer one (RegistryError: fenced); else the stored."""
        stored_token = stored.get("token") if isinstance(stored, dict) else None
        if self.lease is None:
            return stored_token if isinstance(stored_token, int) else None
        try:
            ours = self.lease.check()
        except LeaseLost as error:
            raise RegistryFenced(f"fenced: {error}") from None
        except StoreLeaseError as error:
            raise RegistryUnavailable(str(error)) from None
        if isinstance(stored_token, int) and stored_token > ours:
            raise RegistryFenced(
                f"fenced: {what} carries token {stored_token}, newer than this writer's {ours}"
            )
        return ours

    def _reserve(self) -> int:
        """Move the high-water mark to a fresh number by compare-and-swap; returns it."""
        key = f"{self._base}/HIGH_WATER_MARK"
        for _ in range(_RESERVE_ATTEMPTS):
            try:
                current = self.store.get(key)
            except ObjectNotFound:
                current = None
            except ObjectStoreError as error:
                raise RegistryUnavailable(str(error)) from error
            stored = json.loads(current.data) if current else {}
            token = self._fence(stored, "the high-water mark")
            reserved = int(stored["version"]) if current else 0
            numbers = self._numbers()
            version = max(numbers[-1] if numbers else 0, reserved) + 1
            body = json.dumps({"version": version, "token": token}).encode()
            try:
                if current is None:
                    self.store.put_if_absent(key, body)
                else:
                    self.store.put_if_match(key, body, current.etag)
            except (ObjectExists, PreconditionFailed):
                continue  # another writer moved it: read again
            except ObjectStoreError as error:
                raise RegistryUnavailable(str(error)) from error
            return version
        raise RegistryError(f"{self.store.url_of(key)}: kept changing; is another writer on it?")

    def recover(self) -> int | None:
        """Finish a publish that crashed between its visibility write and its promotion
        (as :meth:`ModelRegistry.recover`). Writer only."""
        numbers = self._numbers()
        if not numbers:
            return None
        newest = self.get(numbers[-1])
        pointer = self._champion_pointer()
        current = int(pointer["version"]) if pointer else 0
        decided = {entry.get("version") for entry in self.decisions()}
        if (
            newest.metadata.get("champion") is True
            and newest.version > current
            and newest.version not in decided
        ):
            self._set_champion(newest.version, "promotion completed after a restart", "promote")
            return newest.version
        return None

    def publish(
        self,
        artifact: bytes,
        metadata: dict[str, Any],
        promote: bool,
        reason: str = "published",
    ) -> VersionInfo:
        """Publish ``artifact`` as the next version (see
        :meth:`stream_trainer.publishing.registry.ModelRegistry.publish` for the metadata stored).

        The artifact is uploaded create-only, then ``metadata.json`` create-only makes the
        version visible in one step. Raises RegistryError, leaving any existing version
        untouched, when either object already exists or (under a lease) the lease was
        taken over: a publish renews the lease first."""
        if self.lease is not None:
            try:
                self.lease.renew()
            except LeaseLost as error:
                raise RegistryFenced(f"fenced: {error}") from None
            except StoreLeaseError as error:  # the store, not a takeover: try again later
                raise RegistryUnavailable(str(error)) from None
        self.recover()
        version = self._reserve()
        stored = json_safe(dict(metadata))
        stored.update(
            {
                "model_name": self.model_name,
                "version": version,
                "created_at": _now(),
                "champion": promote,
                "artifact_file": ARTIFACT_FILE,
                "artifact_sha256": sha256_hex(artifact),
                "artifact_bytes": len(artifact),
            }
        )
        if self._key is not None:
            stored["artifact_hmac"] = sign(self._key, artifact)
        if self.lease is not None and self.lease.token is not None:
            stored["writer_token"] = self.lease.token
        metadata_bytes = _dumps(stored)
        prefix = self._version_prefix(version)
        try:
            self.store.put_if_absent(f"{prefix}/{ARTIFACT_FILE}", artifact)
            self.crash("before_version_visible")
            self._fence(None, "")  # still the holder, just before the version appears
            self.store.put_if_absent(f"{prefix}/{METADATA_FILE}", metadata_bytes)
        except ObjectExists as error:
            raise RegistryError(f"{error}; refusing to overwrite a version") from None
        except ObjectStoreError as error:
            raise RegistryUnavailable(str(error)) from error
        info = self._info(version, json.loads(metadata_bytes))
        if promote:
            gate = stored.get("gate") if isinstance(stored.get("gate"), dict) else {}
            self._set_champion(
                version,
                reason,
                "promote",
                champion_score=gate.get("champion_score"),
                candidate_score=gate.get("candidate_score"),
            )
        self._apply_retention()
        return info

    def record_rejection(
        self, metadata: dict[str, Any], champion_score: float, candidate_score: float
    ) -> str:
        """Record a candidate the gate rejected (no version number is used); returns the
        URL of its record under ``rejected/``."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        candidate_id = f"{stamp}-{uuid.uuid4().hex[:8]}"
        champion = self.champion()
        record = json_safe(
            {
                "candidate_id": candidate_id,
                "model_name": self.model_name,
                "rejected_at": _now(),
                "champion_version": champion.version if champion else None,
                "champion_score": champion_score,
                "candidate_score": candidate_score,
                "metadata": metadata,
            }
        )
        key = f"{self._base}/rejected/{candidate_id}.json"
        self._write(key, _dumps(record))
        self._append_decision(
            {
                "action": "reject",
                "candidate_id": candidate_id,
                "version": None,
                "champion_version": record["champion_version"],
                "champion_score": record["champion_score"],
                "candidate_score": record["candidate_score"],
                "reason": "gate rejected the candidate",
            }
        )
        return self.store.url_of(key)

    def _verified(self, version: int, action: str) -> None:
        try:
            self.load_artifact(version)
        except RegistryError as error:
            raise RegistryError(
                f"refusing to {action} to version {version}: {error}; the champion is unchanged"
            ) from None

    def promote(self, version: int, reason: str) -> None:
        """Make ``version`` the champion (manual promote); refused, changing nothing, when
        it does not exist or fails verification."""
        self._verified(version, "promote")
        self._set_champion(version, reason, "promote")

    def rollback(self, reason: str) -> VersionInfo:
        """Make the previous champion the champion again and return it (as
        :meth:`stream_trainer.publishing.registry.ModelRegistry.rollback`)."""
        current = self.champion()
        if current is None:
            raise RegistryError(f"{self.model_name}: no champion to roll back from")
        existing = set(self._numbers())
        target = rollback_target(self.model_name, current.version, existing, self.decisions())
        self._verified(target, "roll back")
        self._set_champion(target, reason, "rollback", previous=current.version)
        return self.get(target)

    def _set_champion(
        self,
        version: int,
        reason: str,
        action: str,
        *,
        previous: int | None = None,
        champion_score: Any = None,
        candidate_score: Any = None,
    ) -> None:
        if previous is None:
            pointer = self._champion_pointer()
            previous = int(pointer["version"]) if pointer else None
        self._move_champion({"version": version, "since": _now(), "reason": reason})
        self._append_decision(
            json_safe(
                {
                    "action": action,
                    "version": version,
                    "previous": previous,
                    "reason": reason,
                    "champion_score": champion_score,
                    "candidate_score": candidate_score,
                }
            )
        )

    def _move_champion(self, pointer: dict[str, Any]) -> None:
        """Replace CHAMPION by compare-and-swap, fenced (see the module docstring)."""
        key = f"{self._base}/CHAMPION"
        for _ in range(_RESERVE_ATTEMPTS):
            try:
                current = self.store.get(key)
            except ObjectNotFound:
                current = None
            except ObjectStoreError as error:
                raise RegistryUnavailable(str(error)) from error
            stored = json.loads(current.data) if current else None
            body = json.dumps(
                {**pointer, "token": self._fence(stored, "the champion pointer")}, sort_keys=True
            ).encode()
            try:
                if current is None:
                    self.store.put_if_absent(key, body)
                else:
                    self.store.put_if_match(key, body, current.etag)
            except (ObjectExists, PreconditionFailed):
                continue
            except ObjectStoreError as error:
                raise RegistryUnavailable(str(error)) from error
            return
        raise RegistryError(f"{self.store.url_of(key)}: kept changing; is another writer on it?")

    def _append_decision(self, entry: dict[str, Any]) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        key = f"{self._base}/decisions/{stamp}-{uuid.uuid4().hex[:8]}.json"
        body = json.dumps({"ts": _now(), **entry}, sort_keys=True, separators=(",", ":"))
        self._write(key, body.encode())

    def _apply_retention(self) -> None:
        numbers = self._numbers()
        if len(numbers) <= self._keep_last:
            return
        pointer = self._champion_pointer()
        champion = int(pointer["version"]) if pointer else None
        try:
            for number in numbers[: -self._keep_last]:
                if number == champion:
                    continue
                prefix = self._version_prefix(number)
                # Metadata first: the version is gone for readers before its artifact is.
                self.store.delete(f"{prefix}/{METADATA_FILE}")
                for leftover in self.store.list(prefix + "/"):
                    self.store.delete(leftover.key)
                self.store.delete(f"{self._base}/events-sent/{number:08d}")
        except ObjectStoreError as error:
            raise RegistryUnavailable(str(error)) from error
