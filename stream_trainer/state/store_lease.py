"""The single-writer rule on an object store: a lease object with a fencing token.

Two pods on two nodes share no file lock, so the writer of a model on an object store
holds a lease object instead, ``{"holder", "token", "expires_at"}``, changed only by
conditional writes:

- ``acquire`` creates it (``If-None-Match``) or takes over an expired one (``If-Match`` on
  the ETag it read), raising the token by one. Two pods racing: one write wins, the other
  is refused and sees :class:`LeaseHeld`.
- ``renew`` moves ``expires_at`` on, conditional on the ETag of our own last write: if
  anyone took the lease over meanwhile, it raises :class:`LeaseLost` and the holder must
  stop writing. :class:`LeaseKeeper` renews every ``ttl/3`` from the poll loop, so a writer
  keeps its lease while the topic is idle (no checkpoint or publish renews it then).
- The token only grows. Writes that matter carry it (the registry's high-water mark and
  champion pointer), and a writer whose token is lower than the one stored there is
  refused: a stale writer that paused past its expiry cannot publish (fencing).

``expires_at`` is wall-clock time of the writers: the TTL must exceed their clock skew.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.state.objectstore import (
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    PreconditionFailed,
)

log = logging.getLogger(__name__)


class StoreLeaseError(StreamTrainerError):
    """The lease could not be read or written."""


class LeaseHeld(StoreLeaseError):
    """Another holder's lease has not expired (or it won a race for it just now)."""


class LeaseLost(StoreLeaseError):
    """This holder's lease was taken over: stop writing."""


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's content."""

    holder: str
    token: int
    expires_at: float

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        try:
            raw: dict[str, Any] = json.loads(data)
            return cls(str(raw["holder"]), int(raw["token"]), float(raw["expires_at"]))
        except (ValueError, KeyError, TypeError) as error:
            raise StoreLeaseError(f"unreadable lease object: {error}") from error

    def encode(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "token": self.token, "expires_at": self.expires_at},
            sort_keys=True,
        ).encode()


class StoreLease:
    """A lease on ``key`` of ``store`` for ``holder``, valid ``ttl_s`` seconds per renewal.

    ``token`` is the fencing token once acquired (None before). ``clock`` is wall-clock
    seconds (injectable for tests)."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        holder: str,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self._store = store
        self._key = key
        self.holder = holder
        self._ttl_s = ttl_s
        self._clock = clock
        self._etag: str | None = None
        self.token: int | None = None
        # The poll loop (LeaseKeeper) and the checkpoint writer thread both renew.
        self._lock = threading.RLock()

    @property
    def ttl_s(self) -> float:
        """Seconds a renewal keeps the lease valid."""
        return self._ttl_s

    def __repr__(self) -> str:
        return f"StoreLease({self._store.url_of(self._key)!r}, holder={self.holder!r})"

    def read(self) -> tuple[LeaseRecord, str] | None:
        """The stored lease and its ETag, or None when there is none."""
        try:
            found = self._store.get(self._key)
        except ObjectNotFound:
            return None
        except ObjectStoreError as error:
            raise StoreLeaseError(str(error)) from error
        return LeaseRecord.parse(found.data), found.etag

    def acquire(self) -> int:
        """Take the lease (new, expired, or already ours) and return the fencing token.

        Raises LeaseHeld, changing nothing, when another holder's lease is still valid or
        another writer won the race for it."""
        current = self.read()
        now = self._clock()
        if current is not None:
            record, _ = current
            if record.holder != self.holder and record.expires_at > now:
                raise LeaseHeld(
                    f"{self._store.url_of(self._key)}: held by {record.holder!r} for another "
                    f"{record.expires_at - now:.1f} s (token {record.token})"
                )
        token = (current[0].token if current else 0) + 1
        record = LeaseRecord(self.holder, token, now + self._ttl_s)
        try:
            if current is None:
                etag = self._store.put_if_absent(self._key, record.encode())
            else:
                etag = self._store.put_if_match(self._key, record.encode(), current[1])
        except (ObjectExists, PreconditionFailed):
            raise LeaseHeld(
                f"{self._store.url_of(self._key)}: another writer took the lease just now"
            ) from None
        except ObjectStoreError as error:
            raise StoreLeaseError(str(error)) from error
        self._etag, self.token = etag, token
        return token

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now; raises LeaseLost if it was taken over.

        Thread-safe: the poll loop and the checkpoint writer thread may both renew."""
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        if self.token is None or self._etag is None:
            raise LeaseLost("the lease was never acquired")
        record = LeaseRecord(self.holder, self.token, self._clock() + self._ttl_s)
        for _ in range(2):
            try:
                self._etag = self._store.put_if_match(self._key, record.encode(), self._etag)
                return
            except PreconditionFailed:
                # A renewal whose answer was lost (a timeout) may have been applied: the
                # ETag moved, but the lease is still ours when holder and token match.
                current = self.read()
                if current is None or (current[0].holder, current[0].token) != (
                    self.holder,
                    self.token,
                ):
                    break
                self._etag = current[1]
            except ObjectStoreError as error:
                raise StoreLeaseError(str(error)) from error
        self.token = None
        raise LeaseLost(f"{self._store.url_of(self._key)}: taken over by another writer")

    def check(self) -> int:
        """The token, after confirming the stored lease is still ours; raises LeaseLost."""
        current = self.read()
        if self.token is None or current is None or current[0].token != self.token:
            raise LeaseLost(f"{self._store.url_of(self._key)}: this writer no longer holds it")
        return self.token

    def release(self) -> None:
        """Let it expire now (the token stays, so it keeps growing); best effort."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self.token is None or self._etag is None:
            return
        record = LeaseRecord(self.holder, self.token, 0.0)
        # Taken over already, or the store is down: expiry frees it anyway.
        with contextlib.suppress(PreconditionFailed, ObjectStoreError):
            self._store.put_if_match(self._key, record.encode(), self._etag)
        self._etag, self.token = None, None


class LeaseKeeper:
    """Renews held leases every ``ttl/3`` from the poll loop.

    Checkpoints and publishes renew their lease as they write, but an idle writer (a quiet
    topic: the cadence needs a record) writes nothing, and its lease would lapse: a standby
    would take it over and the writer's next write be fenced. Renewing from the poll loop,
    not from a thread of its own, means a writer whose loop is stuck longer than the TTL
    does lose it. ``tick`` raises :class:`LeaseLost` when a lease was taken over; a store
    error is logged and retried ``ttl/10`` later (the lease survives outages shorter than
    the time it has left)."""

    def __init__(
        self, leases: dict[str, StoreLease], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._leases = dict(leases)
        self._clock = clock
        start = clock()
        self._due = {what: start + lease.ttl_s / 3 for what, lease in self._leases.items()}

    def tick(self) -> None:
        """Renew each lease whose turn it is; raises LeaseLost (naming it) if taken over."""
        now = self._clock()
        for what, lease in self._leases.items():
            if now < self._due[what]:
                continue
            try:
                lease.renew()
            except LeaseLost as error:
                raise LeaseLost(f"{what} lease: {error}") from None
            except StoreLeaseError as error:
                log.warning(
                    "lease renewal failed; retrying", extra={"lease": what, "reason": str(error)}
                )
                self._due[what] = now + lease.ttl_s / 10
                continue
            self._due[what] = now + lease.ttl_s / 3
