"""One slot's checkpoints on an object store: a signed ``MANIFEST`` moved only by
conditional writes, create-only checkpoint objects named by sequence and fencing token,
and a claim that fences the previous owner (docs/design/scale-out.md, section 5).

Layout under the model's root (a store rooted at ``<checkpoint.dir>/<model>/``)::

    partition/<topic>/<p>/               scope "partition", scope id "<topic>:<p>"
      MANIFEST                           signed JSON: token, owner, head, previous, offsets
      ckpt-<seq:012d>-t<token>.ckpt      create-only; checkpoint.py's format, its manifest
                                         carrying scope, scope_id and token
    key/<hash>/                          scope "key", hash = sha256(key bytes)[:32], hex
      MANIFEST, ckpt-…                   as above
    global/                              scope "global", scope id "global"
      MANIFEST, ckpt-…                   as above
    quarantine/<scope path>/ckpt-….ckpt.<reason>   (+ ``.reason``), as ObjectCheckpointStore

The ``MANIFEST`` (HMAC-SHA256 under the checkpoint key, its own signing context)::

    {"scope", "scope_id", "token", "owner", "head", "previous", "offsets", "sha256",
     "signed", "hmac"}

- It is created with ``If-None-Match`` and otherwise changed only ``If-Match`` on the ETag
  of this owner's own last read or write.
- **Claim** (:meth:`SlotStore.claim`): ``token + 1``, ``owner`` = this member, ``head``
  kept. From then on the previous owner's CAS fails: it is fenced (:class:`SlotFenced`).
- **Write** (:meth:`SlotStore.write`): upload ``ckpt-<seq>-t<token>.ckpt`` create-only,
  then move ``head`` (the old head joins ``previous``, at most ``keep_last - 1``) and
  ``offsets`` by CAS. Only after that CAS may the offsets be committed. A zombie's upload
  carries its old token, so it never collides with the owner's and is never named.
- **Lost answers**: a CAS whose answer was lost may have been applied; a re-read that
  shows this owner's own token (and, right after the write, its own head) is adopted
  rather than taken for a fence.
- **Restore** (:meth:`SlotStore.restore`): ``head``, then each ``previous``; a checkpoint
  that fails verification is quarantined, a missing one skipped.
- **Retention** (:meth:`SlotStore.retain`, after every write): deletes the checkpoint
  objects the MANIFEST does not name whose token is below its token (a fenced owner's),
  or is its token with a sequence below its head's (superseded); a higher token is a later
  owner's and is left alone.

Not wired into the service yet: the service still checkpoints one ``global`` state
through ``store_checkpoint.ObjectCheckpointStore``; the slots' owners, restore thread and
commits are later steps of the design's migration order.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from stream_trainer.state.checkpoint import (
    PAYLOAD_CHECKSUM,
    SCOPE_MISMATCH,
    SEQUENCE_MISMATCH,
    CheckpointError,
    CheckpointFenced,
    CheckpointManifest,
    LoadedCheckpoint,
    WriteResult,
    _Rejected,
)
from stream_trainer.state.objectstore import (
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    PreconditionFailed,
)
from stream_trainer.state.store_checkpoint import ObjectCodec

log = logging.getLogger(__name__)

SCOPES = ("global", "partition", "key")
MANIFEST = "MANIFEST"
# A claim refused this many times more (other claimants, or a late write of the previous
# owner) gives the slot up: the design's "treat the partition as lost".
CLAIM_RETRIES = 3
# Domain separation from the checkpoint manifests signed with the same key.
_MANIFEST_CONTEXT = b"stream-trainer slot manifest v1\n"
_OBJECT = re.compile(r"^ckpt-(\d{12})-t(\d+)\.ckpt$")
_KEY_HASH = re.compile(r"^[0-9a-f]{32}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]+$")  # Kafka's legal topic characters


class SlotFenced(CheckpointFenced):
    """Another member claimed the slot (its MANIFEST carries a newer token): this one must
    drop the slot, writing and committing nothing more for it."""


def object_name(sequence: int, token: int) -> str:
    """The name of a slot's checkpoint ``sequence`` written under ``token``."""
    return f"ckpt-{sequence:012d}-t{token}.ckpt"


def parse_object_name(name: str) -> tuple[int, int] | None:
    """``(sequence, token)`` of a slot checkpoint's name, None for anything else."""
    match = _OBJECT.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def scope_path(scope: str, scope_id: str) -> str:
    """The folder of a slot under the model's root; ValueError for a malformed id."""
    if scope == "global" and scope_id == "global":
        return "global"
    if scope == "partition":
        topic, _, partition = scope_id.rpartition(":")
        if _TOPIC.match(topic) and partition.isdigit() and topic not in (".", ".."):
            return f"partition/{topic}/{int(partition)}"
    if scope == "key" and _KEY_HASH.match(scope_id):
        return f"key/{scope_id}"
    raise ValueError(f"no slot for scope {scope!r} and scope id {scope_id!r}")


@dataclass(frozen=True)
class SlotManifest:
    """The ``MANIFEST``'s content (its signature checked, or unsigned mode allowed)."""

    scope: str
    scope_id: str
    token: int
    owner: str
    head: str | None
    previous: tuple[str, ...]
    offsets: dict[str, int]  # "topic:partition" -> next offset, as of head
    sha256: str | None  # of head's payload

    @property
    def named(self) -> tuple[str, ...]:
        """``head`` then ``previous``: the objects a restore tries, newest first."""
        return ((self.head,) if self.head else ()) + self.previous

    def claimed_by(self, owner: str) -> SlotManifest:
        """This MANIFEST claimed by ``owner``: the next token, the same head."""
        return replace(self, token=self.token + 1, owner=owner)

    def advanced(
        self,
        head: str,
        sha256: str,
        offsets: Mapping[str, int],
        keep_last: int,
        dropped: Collection[str],
    ) -> SlotManifest:
        """``head`` made the newest; the names before it that are not ``dropped`` (failed
        or gone at restore) kept as ``previous``, ``keep_last - 1`` at most."""
        older = [name for name in self.named if name not in dropped][: keep_last - 1]
        return replace(self, head=head, previous=tuple(older), offsets=dict(offsets), sha256=sha256)

    def fields(self) -> dict[str, Any]:
        """The JSON fields, signature aside."""
        return {
            "scope": self.scope,
            "scope_id": self.scope_id,
            "token": self.token,
            "owner": self.owner,
            "head": self.head,
            "previous": list(self.previous),
            "offsets": dict(self.offsets),
            "sha256": self.sha256,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> SlotManifest:
        """Parse authenticated fields; ValueError for a wrong field or type."""
        fields = dict(fields)
        fields.pop("signed", None)
        if set(fields) != set(cls.__dataclass_fields__):
            raise ValueError(f"fields are {sorted(fields)}")
        token, previous, offsets = fields["token"], fields["previous"], fields["offsets"]
        texts = (fields["scope"], fields["scope_id"], fields["owner"])
        if not all(isinstance(text, str) for text in texts):
            raise ValueError("scope, scope_id and owner must be strings")
        if not isinstance(token, int) or isinstance(token, bool) or token < 1:
            raise ValueError("token must be a positive integer")
        if not all(isinstance(v, str | None) for v in (fields["head"], fields["sha256"])):
            raise ValueError("head and sha256 must be strings or null")
        if not isinstance(previous, list) or not all(
            isinstance(name, str) and parse_object_name(name) for name in previous
        ):
            raise ValueError("previous must list slot checkpoints")
        if fields["head"] is not None and not parse_object_name(fields["head"]):
            raise ValueError("head must name a slot checkpoint")
        if not isinstance(offsets, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in offsets.values()
        ):
            raise ValueError("offsets must map partitions to integers")
        return cls(**{**fields, "previous": tuple(previous)})


@dataclass(frozen=True)
class ManifestRead:
    """A MANIFEST as read (None: absent) and the ETag a CAS on it must carry."""

    manifest: SlotManifest | None
    etag: str | None


class SlotStore(ObjectCodec):
    """The checkpoints of one slot (``scope``, ``scope_id``) under ``store``, the model's
    root, for the member ``member_id``; see the module docstring.

    :meth:`read` is read-only. :meth:`claim` makes this member the owner; :meth:`write`,
    :meth:`restore` and :meth:`retain` need the claim and raise :class:`SlotFenced` once
    another member claimed the slot. A writer that is fenced stays so (claim again to
    own the slot anew).
    """

    def __init__(
        self,
        store: ObjectStore,
        scope: str,
        scope_id: str,
        member_id: str,
        key: bytes | None,
        allow_unsigned: bool,
        keep_last: int,
        *,
        on_quarantine: Callable[[Any, str], None] | None = None,
        crash: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(store.url, key, allow_unsigned, keep_last, on_quarantine, crash)
        self.store = store
        self.scope = scope
        self.scope_id = scope_id
        self.member_id = member_id
        self.path = scope_path(scope, scope_id)
        self._manifest: SlotManifest | None = None  # as this owner last read or wrote it
        self._etag: str | None = None
        self._etag_known = False  # False after an answer that may not tell the truth
        self._fenced: str | None = None
        self._dropped: set[str] = set()  # names that failed or were gone at restore
        self._head_sha: dict[str, str] = {}  # the claimed head's payload sha256

    def __repr__(self) -> str:
        return f"SlotStore({self.store.url_of(self.path)!r}, member={self.member_id!r})"

    @property
    def manifest(self) -> SlotManifest | None:
        """The MANIFEST as this owner last claimed or wrote it; None before a claim or
        once fenced."""
        return self._manifest

    def _at(self, name: str) -> str:
        return f"{self.path}/{name}"

    # ------------------------------------------------------------------ the MANIFEST

    def read(self) -> ManifestRead:
        """The MANIFEST and its ETag (one GET); raises CheckpointError when it cannot be
        read or does not verify (an operator must look: it is never quarantined)."""
        key = self._at(MANIFEST)
        try:
            found = self.store.get(key)
        except ObjectNotFound:
            return ManifestRead(None, None)
        except ObjectStoreError as error:
            raise CheckpointError(f"{self.store.url_of(key)} unreadable: {error}") from error
        try:
            fields = self._authenticated_fields(found.data, _MANIFEST_CONTEXT)
            manifest = SlotManifest.from_fields(fields)
        except (_Rejected, ValueError) as error:
            raise CheckpointError(
                f"{self.store.url_of(key)} does not verify ({error}); the slot is unusable "
                "until it is restored from a backup or removed"
            ) from None
        if (manifest.scope, manifest.scope_id) != (self.scope, self.scope_id):
            raise CheckpointError(
                f"{self.store.url_of(key)} belongs to {manifest.scope} {manifest.scope_id!r}"
            )
        return ManifestRead(manifest, found.etag)

    def _swap(self, target: SlotManifest, etag: str | None) -> str:
        """Write ``target`` if the MANIFEST's ETag is still ``etag`` (absent when None);
        its new ETag. Raises PreconditionFailed / ObjectExists when refused.

        An answer lost (timeout, outage) may hide an applied write: a re-read showing
        ``target`` itself is adopted; anything else raises CheckpointError."""
        key = self._at(MANIFEST)
        data = self._signed_json(
            {**target.fields(), "signed": self._key is not None}, _MANIFEST_CONTEXT
        )
        try:
            if etag is None:
                return self.store.put_if_absent(key, data)
            return self.store.put_if_match(key, data, etag)
        except (PreconditionFailed, ObjectExists):
            raise
        except ObjectStoreError as error:
            try:
                seen = self.read()
            except CheckpointError:
                seen = ManifestRead(None, None)
            if seen.manifest == target and seen.etag is not None:
                log.info("%s: the answer was lost but the write applied; adopted", key)
                return seen.etag
            raise CheckpointError(f"{self.store.url_of(key)} not written: {error}") from error

    def claim(self, seen: ManifestRead | None = None) -> SlotManifest:
        """Make this member the slot's owner: CAS on the ETag of ``seen`` (read now when
        None) with ``token + 1`` and ``owner`` = this member, ``head`` kept; created with
        token 1 when absent. A refused CAS is retried on a fresh read up to
        :data:`CLAIM_RETRIES` times, then SlotFenced (treat the slot as lost). Raises
        CheckpointError on a store error."""
        with self._write_lock:
            read = seen if seen is not None else self.read()
            for attempt in range(1 + CLAIM_RETRIES):
                if attempt:
                    read = self.read()
                target = (
                    read.manifest.claimed_by(self.member_id)
                    if read.manifest is not None
                    else SlotManifest(
                        self.scope, self.scope_id, 1, self.member_id, None, (), {}, None
                    )
                )
                try:
                    etag = self._swap(target, read.etag)
                except (PreconditionFailed, ObjectExists):
                    log.info("%s changed during the claim; reading it again", self.path)
                    continue
                self._owned(target, etag)
                self._fenced = None
                self._last_sequence = None  # from the claimed names, at the first write
                self._dropped.clear()
                self._head_sha = (
                    {target.head: target.sha256} if target.head and target.sha256 else {}
                )
                log.info("slot %s claimed by %s, token %d", self.path, self.member_id, target.token)
                return target
        raise SlotFenced(
            f"{self.store.url_of(self._at(MANIFEST))} kept changing during the claim "
            f"({1 + CLAIM_RETRIES} tries): another member is claiming it; slot lost"
        )

    def _owned(self, manifest: SlotManifest, etag: str) -> None:
        self._manifest, self._etag, self._etag_known = manifest, etag, True

    def _current(self) -> SlotManifest:
        """The claimed MANIFEST, re-read when its ETag is in doubt: a re-read still
        carrying this owner's token is its own (a write whose answer was lost) and is
        adopted; any other raises SlotFenced."""
        if self._manifest is None:
            if self._fenced is not None:
                raise SlotFenced(self._fenced)
            raise CheckpointError(f"slot {self.path} is not claimed by {self.member_id}")
        if not self._etag_known:
            seen = self.read()
            mine = self._manifest.token, self.member_id
            if (
                seen.manifest is None
                or seen.etag is None
                or ((seen.manifest.token, seen.manifest.owner) != mine)
            ):
                found = (
                    f"token {seen.manifest.token}, owner {seen.manifest.owner!r}"
                    if seen.manifest
                    else "no MANIFEST"
                )
                self._manifest = None
                self._fenced = (
                    f"slot {self.path} was claimed over ({found}); {self.member_id} "
                    f"(token {mine[0]}) writes nothing more to it"
                )
                raise SlotFenced(self._fenced)
            self._owned(seen.manifest, seen.etag)
        return self._manifest

    # ------------------------------------------------------------------ writing

    def _object_name(self, sequence: int) -> str:
        return self._at(object_name(sequence, self._current().token))

    def _next_sequence(self) -> int:
        if self._last_sequence is None:
            named = (parse_object_name(name) for name in self._current().named)
            self._last_sequence = max((p[0] for p in named if p), default=0)
        return self._last_sequence + 1

    def _check_offsets(self, offsets: Mapping[str, int]) -> None:
        # Only a partition's own offset may be committed from its slot (design 5.1).
        if self.scope == "partition" and set(offsets) != {self.scope_id}:
            raise ValueError(f"a partition slot's offsets are {{{self.scope_id!r}: n}} only")
        if self.scope == "key" and offsets:
            raise ValueError("a key slot holds no committable offset")

    def write(self, payload: bytes, manifest_fields: dict[str, Any]) -> WriteResult[str]:
        """Upload ``payload`` as the slot's next checkpoint and make it the MANIFEST's
        head; ``manifest_fields`` as for :meth:`CheckpointStore.write`, the offsets being
        the slot's own. Then :meth:`retain`.

        Raises SlotFenced when another member claimed the slot, CheckpointError for a
        store error; either way the MANIFEST does not name the upload and the caller must
        not commit."""
        started = time.monotonic()
        fields = self._manifest_fields(payload, manifest_fields)
        self._check_offsets(fields["offsets"])
        with self._write_lock:
            fields.update(scope=self.scope, scope_id=self.scope_id, token=self._current().token)
            sequence, header = self._upload(payload, fields)
            name = object_name(sequence, fields["token"])
            self._crash("before_checkpoint_visible")
            self._move(name, fields["offsets"], fields["payload_sha256"])
            self._crash("after_rename")
            self._retain()
        return WriteResult(
            path=self.store.url_of(self._at(name)),
            size_bytes=len(header) + len(payload),
            duration_s=time.monotonic() - started,
            sequence=sequence,
        )

    def _move(self, name: str, offsets: Mapping[str, int], sha256: str) -> None:
        for _ in range(3):
            base = self._current()
            target = base.advanced(name, sha256, offsets, self._keep_last, self._dropped)
            try:
                etag = self._swap(target, self._etag)
            except (PreconditionFailed, ObjectExists):
                self._etag_known = False  # ours (an earlier lost answer) or a claim: re-read
                continue
            except CheckpointError:
                self._etag_known = False
                raise
            self._owned(target, etag)
            return
        raise CheckpointError(f"{self.store.url_of(self._at(MANIFEST))} kept changing")

    # ------------------------------------------------------------------ reading

    def _check_identity(self, manifest: CheckpointManifest, name: str) -> None:
        base = name.rsplit("/", 1)[-1]
        if parse_object_name(base) != (manifest.sequence, manifest.token):
            raise _Rejected(
                SEQUENCE_MISMATCH,
                f"manifest sequence {manifest.sequence} and token {manifest.token} do not "
                "match the object name",
            )
        if (manifest.scope, manifest.scope_id) != (self.scope, self.scope_id):
            raise _Rejected(
                SCOPE_MISMATCH,
                f"written for {manifest.scope} {manifest.scope_id!r}, found in {self.path}",
            )
        expected = self._head_sha.get(base)
        if expected is not None and expected != manifest.payload_sha256:
            raise _Rejected(PAYLOAD_CHECKSUM, "payload sha256 differs from the MANIFEST's")

    def read_head(self) -> LoadedCheckpoint[str] | None:
        """The MANIFEST's head checkpoint, verified and unpickled, or None when the slot
        has none; read-only (no claim, nothing quarantined): safe beside its owner, for
        inspection and test oracles. Raises CheckpointError when it does not verify."""
        manifest = self.read().manifest
        if manifest is None or manifest.head is None:
            return None
        return self._read_verified(manifest.head)

    def read_named(self) -> tuple[SlotManifest, list[LoadedCheckpoint[str]]] | None:
        """The MANIFEST (read afresh) and every checkpoint it names, head first, each
        verified and unpickled; None when the slot has no MANIFEST. Read-only (no claim,
        nothing quarantined). Raises CheckpointError when any of them cannot be read: a
        caller deciding what no checkpoint names must know all of them."""
        manifest = self.read().manifest
        if manifest is None:
            return None
        return manifest, [self._read_verified(name) for name in manifest.named]

    def _read_verified(self, name: str) -> LoadedCheckpoint[str]:
        """Checkpoint ``name`` of this slot, verified and unpickled, never quarantined;
        CheckpointError when it does not verify."""
        try:
            return self._load(self._at(name), None)
        except _Rejected as rejected:
            raise CheckpointError(f"{self.store.url_of(self._at(name))}: {rejected}") from None

    def restore(
        self, validate: Callable[[Any, CheckpointManifest], None] | None = None
    ) -> LoadedCheckpoint[str] | None:
        """The claimed head if it verifies, unpickles and validates, else the first
        ``previous`` one that does (its manifest's offsets are where to start), else None.
        Each failing one is quarantined, a missing one skipped; the next write leaves
        them out of ``previous``. Owner only; raises CheckpointError on a policy refusal
        or a store error."""
        with self._write_lock:  # it quarantines, and the next write reads _dropped
            names = self._current().named
            loaded, passed = self._load_first(
                [self._at(name) for name in names], validate, skip_missing=True
            )
            self._dropped.update(key.rsplit("/", 1)[-1] for key in passed)
        if loaded is not None and passed:
            log.warning("slot %s: head %s unusable; restored %s", self.path, names[0], loaded.path)
        return loaded

    # ------------------------------------------------------------------ retention

    def retain(self) -> int:
        """Delete the slot's checkpoint objects the MANIFEST (as this owner last wrote it)
        does not name and whose token is below its token, or equal with a sequence below
        its head's; returns how many. Owner only; housekeeping: store errors are logged."""
        with self._write_lock:
            return self._retain()

    def _retain(self) -> int:
        manifest = self._current()
        head = parse_object_name(manifest.head) if manifest.head else None
        try:
            listed = self._list(f"{self.path}/")
        except CheckpointError as error:
            log.warning("slot %s: could not list for retention: %s", self.path, error)
            return 0
        removed = 0
        for info in listed:
            name = info.key[len(self.path) + 1 :]
            parsed = parse_object_name(name)
            if parsed is None or name in manifest.named:
                continue
            sequence, token = parsed
            # A newer token is a later owner's (claimed since): never this one's to delete.
            superseded = token == manifest.token and head is not None and sequence < head[0]
            if token < manifest.token or superseded:
                try:
                    self.store.delete(info.key)
                    removed += 1
                except ObjectStoreError as error:
                    log.warning("slot %s: could not delete %s: %s", self.path, name, error)
        return removed
