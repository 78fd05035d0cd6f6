"""The immutable on-disk model registry (file logic only; no Kafka).

Layout under ``<root>/<model_name>/``::

    versions/<version:08d>/model.pkl       the artifact (bytes as given)
    versions/<version:08d>/metadata.json   lineage + artifact_sha256 (+ artifact_hmac)
    CHAMPION                               {"version": n, "since": ts, "reason": ...}
    HIGH_WATER_MARK                        {"version": n}: the highest number ever reserved
    decisions.jsonl                        append-only promote / reject / rollback log
    rejected/<candidate-id>.json           rejected candidates with both scores
    events-sent/<version:08d>              marker: the version event was delivered

Contracts:

- A version directory appears only by an atomic rename of a fully written, fsynced temp
  directory; readers never see a half-written version. Leftover ``.tmp-*`` directories
  (a crash mid-publish) are invisible and removed by the next :meth:`ModelRegistry.publish`.
- Version numbers strictly increase and are never reused, across restarts and after old
  versions are deleted (the high-water mark is written before the directory appears).
- Retention keeps the last ``keep_last`` versions and never deletes the champion.
- One writer publishes (the service holds the checkpoint lock); manual promote/rollback
  only touch ``CHAMPION`` (atomic replace) and ``decisions.jsonl`` (single appends).
"""

from __future__ import annotations

import builtins
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.signing import sha256_hex, sign, verify

if TYPE_CHECKING:
    from stream_trainer.config import ObjectStoreSettings

ARTIFACT_FILE = "model.pkl"
METADATA_FILE = "metadata.json"
_VERSION_DIR = re.compile(r"^\d{8}$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class RegistryError(StreamTrainerError):
    """A registry operation failed: unknown version, integrity or signature failure."""


class RegistryFenced(RegistryError):
    """Refused because this writer no longer owns the model (its lease was taken over, or
    its slot claimed by another member): it must stop publishing; nothing was changed."""


class RegistryUnavailable(RegistryError):
    """The registry's object store could not be reached or answered an error: transient,
    nothing was made visible half-way; the caller may try again later."""


@dataclass(frozen=True)
class VersionInfo:
    """A published version: its number, directory and metadata (as stored).

    ``path`` is the version's folder on disk; in an object-store registry it is the
    version's key prefix and ``url`` its ``s3://`` location (``path`` is then no file).
    """

    version: int
    path: Path
    metadata: dict[str, Any]
    url: str | None = None

    @property
    def artifact_path(self) -> Path:
        """Where the artifact bytes are (local registries)."""
        return self.path / ARTIFACT_FILE

    @property
    def artifact_uri(self) -> str:
        """The artifact's URL (``file://`` or ``s3://``), as version events carry it."""
        if self.url is not None:
            return f"{self.url}/{self.metadata.get('artifact_file', ARTIFACT_FILE)}"
        return self.artifact_path.as_uri()

    @property
    def location(self) -> str:
        """The version folder as a path or URL, for people."""
        return self.url if self.url is not None else str(self.path)


class Registry(Protocol):
    """What the publisher, the version events and the CLI need of a registry: the local
    :class:`ModelRegistry` or the object-store
    :class:`stream_trainer.publishing.store_registry.StoreRegistry`, with the same contracts."""

    model_name: str

    def list(self) -> builtins.list[VersionInfo]: ...
    def get(self, version: int) -> VersionInfo: ...
    def champion(self) -> VersionInfo | None: ...
    def decisions(self) -> builtins.list[dict[str, Any]]: ...
    def load_artifact(self, version: int) -> bytes: ...
    def next_version(self) -> int: ...
    def recover(self) -> int | None: ...
    def publish(
        self, artifact: bytes, metadata: dict[str, Any], promote: bool, reason: str = ...
    ) -> VersionInfo: ...
    def record_rejection(
        self, metadata: dict[str, Any], champion_score: float, candidate_score: float
    ) -> object: ...
    def promote(self, version: int, reason: str) -> None: ...
    def rollback(self, reason: str) -> VersionInfo: ...
    def event_sent(self, info: VersionInfo) -> bool: ...
    def mark_event_sent(self, info: VersionInfo) -> None: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync the file (not the directory)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync the dir."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None: JSON has no NaN, and readers in other
    languages reject it (e.g. an r2 over too few records)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def verify_artifact(
    artifact: bytes, sha256: str | None, signature: str | None, key: bytes | None
) -> None:
    """Raise RegistryError unless ``artifact`` matches ``sha256`` and, when a key is given,
    carries a valid HMAC ``signature`` (an unsigned artifact is refused under a key)."""
    if not sha256 or sha256_hex(artifact) != sha256:
        raise RegistryError("artifact sha256 mismatch (corrupt or tampered artifact)")
    if key is None:
        return
    if not signature:
        raise RegistryError("artifact is unsigned but an HMAC key is configured")
    if not verify(key, artifact, signature):
        raise RegistryError("artifact HMAC does not verify (tampered, or a different key)")


def champion_history(decisions: builtins.list[dict[str, Any]]) -> builtins.list[int]:
    """Champions in order, promote pushing and rollback popping (see ``rollback``)."""
    stack: builtins.list[int] = []
    for entry in decisions:
        version = entry.get("version")
        if not isinstance(version, int):
            continue
        if entry.get("action") == "promote":
            if not stack or stack[-1] != version:
                stack.append(version)
        elif entry.get("action") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
    return stack


def rollback_target(
    model_name: str, current: int, existing: set[int], decisions: builtins.list[dict[str, Any]]
) -> int:
    """The version a rollback from ``current`` goes to: the previous champion in the
    decision history that still exists, else the newest existing version below ``current``.
    Raises RegistryError when there is none. Shared by the folder and object-store
    registries so both roll back alike."""
    history = champion_history(decisions)
    while history and history[-1] == current:
        history.pop()
    target = next((v for v in reversed(history) if v in existing and v != current), None)
    if target is not None:
        return target
    older = [v for v in existing if v < current]
    if not older:
        raise RegistryError(f"{model_name}: no version to roll back to from {current}")
    return max(older)


def sent_marker(info: VersionInfo) -> Path:
    """The marker file saying the version event of ``info`` was delivered.

    Kept outside the version directory, which is immutable once published.
    """
    return info.path.parent.parent / "events-sent" / info.path.name


class ModelRegistry:
    """Versions of one model under ``root / model_name``; see the module docstring."""

    def __init__(
        self,
        root: Path,
        model_name: str,
        key: bytes | None,
        keep_last: int,
        crash: Callable[[str], None] | None = None,
        folder: str | None = None,
    ) -> None:
        """``folder``: where under ``root`` the versions live (default ``model_name``; a
        scoped model's slot passes ``scoped_versions.scope_prefix(...)``), while
        ``model_name`` is what metadata and rejection records name."""
        self.crash = crash or (lambda _point: None)
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        # Absolute: artifact URIs in version events are file URIs, which cannot be relative.
        self.root = Path(root).absolute()
        self.model_name = model_name
        self.base = self.root / (folder or model_name)
        self.versions_dir = self.base / "versions"
        self.rejected_dir = self.base / "rejected"
        self.events_dir = self.base / "events-sent"
        self._champion_file = self.base / "CHAMPION"
        self._hwm_file = self.base / "HIGH_WATER_MARK"
        self._decisions_file = self.base / "decisions.jsonl"
        self._key = key
        self._keep_last = keep_last

    # -- reading -----------------------------------------------------------------------

    def _version_dirs(self) -> builtins.list[tuple[int, Path]]:
        if not self.versions_dir.is_dir():
            return []
        found = [
            (int(entry.name), entry)
            for entry in self.versions_dir.iterdir()
            if _VERSION_DIR.match(entry.name) and (entry / METADATA_FILE).is_file()
        ]
        return sorted(found)

    def _read_info(self, version: int, path: Path) -> VersionInfo:
        try:
            metadata = json.loads((path / METADATA_FILE).read_bytes())
        except (OSError, ValueError) as error:
            raise RegistryError(f"version {version}: unreadable metadata: {error}") from error
        return VersionInfo(version=version, path=path, metadata=metadata)

    def list(self) -> builtins.list[VersionInfo]:
        """Every published version, oldest first."""
        return [self._read_info(number, path) for number, path in self._version_dirs()]

    def get(self, version: int) -> VersionInfo:
        """The version ``version``; raises RegistryError when it does not exist."""
        path = self.versions_dir / f"{version:08d}"
        if not (path / METADATA_FILE).is_file():
            raise RegistryError(f"{self.model_name}: no version {version}")
        return self._read_info(version, path)

    def champion(self) -> VersionInfo | None:
        """The current champion, or None when none was promoted (or it is gone)."""
        pointer = self._champion_pointer()
        if pointer is None:
            return None
        try:
            return self.get(int(pointer["version"]))
        except RegistryError:
            return None

    def _champion_pointer(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._champion_file.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as error:
            raise RegistryError(f"{self._champion_file}: unreadable: {error}") from error
        return data

    def decisions(self) -> builtins.list[dict[str, Any]]:
        """The decisions log, oldest first (a torn last line from a crash is skipped)."""
        try:
            lines = self._decisions_file.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def load_artifact(self, version: int) -> bytes:
        """The artifact bytes of ``version``, verified (sha256, and HMAC under a key)
        before they are returned; raises RegistryError on any mismatch."""
        info = self.get(version)
        try:
            artifact = info.artifact_path.read_bytes()
        except OSError as error:
            raise RegistryError(f"version {version}: unreadable artifact: {error}") from error
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
        """True once the version event of ``info`` was delivered (its marker exists)."""
        return sent_marker(info).exists()

    def mark_event_sent(self, info: VersionInfo) -> None:
        """Record that the version event of ``info`` was delivered."""
        marker = sent_marker(info)
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, b"")

    # -- writing -----------------------------------------------------------------------

    def _high_water_mark(self) -> int:
        try:
            return int(json.loads(self._hwm_file.read_bytes())["version"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as error:
            raise RegistryError(f"{self._hwm_file}: unreadable: {error}") from error

    def next_version(self) -> int:
        """The number the next published version gets: above every version that exists
        and every number ever reserved (rejected candidates get ids, not versions)."""
        dirs = self._version_dirs()
        highest = dirs[-1][0] if dirs else 0
        return max(highest, self._high_water_mark()) + 1

    def _remove_incomplete(self) -> None:
        # Only under versions/, where the one writer alone creates temp dirs; a temp file
        # next to CHAMPION may belong to a concurrent manual promote.
        for entry in self.versions_dir.iterdir():
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)

    def recover(self) -> int | None:
        """Finish a publish that crashed between its rename and its promotion: the newest
        version marked ``champion`` that is newer than the champion pointer and has no
        decision yet becomes champion. Returns that version, or None. Writer only."""
        dirs = self._version_dirs()
        if not dirs:
            return None
        newest = self._read_info(*dirs[-1])
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
        """Publish ``artifact`` as the next version; durable before this returns.

        ``metadata`` (the lineage) is stored with ``model_name``, ``version``,
        ``created_at``, ``champion`` (= ``promote``), ``artifact_sha256`` and, under a key,
        ``artifact_hmac`` added. Non-finite floats are stored as null. With ``promote`` the
        version becomes champion (recorded in the decisions log with ``reason`` and the
        scores in ``metadata["gate"]`` if any). Then retention runs. The returned metadata
        is what was read back from disk, so events built from it repeat byte for byte.
        """
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._remove_incomplete()
        self.recover()
        version = self.next_version()
        # Reserve the number before the directory can appear: a crash after this point
        # skips the number, never reuses it.
        atomic_write(self._hwm_file, json.dumps({"version": version}).encode())

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
        metadata_bytes = json.dumps(stored, sort_keys=True, indent=2, allow_nan=False).encode()

        final = self.versions_dir / f"{version:08d}"
        if final.exists():
            raise RegistryError(f"{final} already exists; refusing to overwrite a version")
        tmp = self.versions_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            _write_durable(tmp / ARTIFACT_FILE, artifact)
            _write_durable(tmp / METADATA_FILE, metadata_bytes)
            _fsync_dir(tmp)
            self.crash("before_version_visible")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.versions_dir)

        info = VersionInfo(version=version, path=final, metadata=json.loads(metadata_bytes))
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
    ) -> Path:
        """Record a candidate the gate rejected (no version number is used); returns the
        path of its record under ``rejected/``."""
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
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
        path = self.rejected_dir / f"{candidate_id}.json"
        atomic_write(path, json.dumps(record, sort_keys=True, indent=2).encode())
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
        return path

    def promote(self, version: int, reason: str) -> None:
        """Make ``version`` the champion (manual promote); recorded in the decisions log.

        Raises RegistryError, changing nothing, when the version does not exist or its
        artifact fails verification (sha256, and HMAC under a key)."""
        self._verified(version, "promote")
        self._set_champion(version, reason, "promote")

    def _verified(self, version: int, action: str) -> None:
        try:
            self.load_artifact(version)
        except RegistryError as error:
            raise RegistryError(
                f"refusing to {action} to version {version}: {error}; the champion is unchanged"
            ) from None

    def rollback(self, reason: str) -> VersionInfo:
        """Make the previous champion the champion again and return it.

        "Previous" undoes promotions in order (promote pushes, rollback pops), skipping
        versions that no longer exist; with no such history, the newest existing version
        below the current champion. Raises RegistryError, changing nothing, when there is
        nothing to go to or that version's artifact fails verification.
        """
        current = self.champion()
        if current is None:
            raise RegistryError(f"{self.model_name}: no champion to roll back from")
        existing = {number for number, _ in self._version_dirs()}
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
        since = _now()
        pointer_bytes = json.dumps(
            {"version": version, "since": since, "reason": reason}, sort_keys=True
        ).encode()
        atomic_write(self._champion_file, pointer_bytes)
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

    def _append_decision(self, entry: dict[str, Any]) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"ts": _now(), **entry}, sort_keys=True, separators=(",", ":"))
        # One write() of one line with O_APPEND: concurrent appenders (service and CLI)
        # do not interleave within a line.
        fd = os.open(self._decisions_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _apply_retention(self) -> None:
        dirs = self._version_dirs()
        if len(dirs) <= self._keep_last:
            return
        pointer = self._champion_pointer()
        champion = int(pointer["version"]) if pointer else None
        for number, path in dirs[: -self._keep_last]:
            if number == champion:
                continue
            # Rename out of the way first so a half-deleted version is never visible.
            trash = self.versions_dir / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            (self.events_dir / path.name).unlink(missing_ok=True)
        _fsync_dir(self.versions_dir)


def open_registry(
    root: Path | str,
    model_name: str,
    key: bytes | None,
    keep_last: int,
    store_settings: ObjectStoreSettings | None = None,
    crash: Callable[[str], None] | None = None,
    read_retry_s: float | None = None,
    observe: Callable[[str, float, bool], None] | None = None,
    folder: str | None = None,
) -> Registry:
    """The registry at ``root``: :class:`ModelRegistry` for a folder, a
    :class:`stream_trainer.publishing.store_registry.StoreRegistry` for an object-store URL
    (``s3://``, ``gs://``, ``az://``) whose requests are told to ``observe`` (an
    :data:`stream_trainer.state.objectstore.RequestObserver`). With ``read_retry_s`` the store's
    reads are retried on transient errors for at most that long (:class:`RetryingStore`);
    writes never are. ``folder``: where under ``root`` (default ``model_name``; a scoped
    model's slot: ``scoped_versions.scope_prefix``)."""
    from stream_trainer.publishing.store_registry import StoreRegistry  # noqa: PLC0415
    from stream_trainer.state.objectstore import (  # noqa: PLC0415
        ObjectStore,
        RetryingStore,
        is_store_url,
        open_store,
    )

    if not is_store_url(root):
        return ModelRegistry(Path(root), model_name, key, keep_last, crash=crash, folder=folder)
    store: ObjectStore = open_store(root, store_settings, observe)
    if read_retry_s is not None:
        store = RetryingStore(store, retry_for_s=read_retry_s)
    return StoreRegistry(store, model_name, key, keep_last, crash=crash, folder=folder)
