"""Where registries (and later checkpoints) keep their bytes: a local folder or an object store.

One small protocol, :class:`ObjectStore`, with the operations the guarantees need and no
more: ``get``, ``put`` (overwrite), ``put_if_absent`` (create only: never overwrites, the
``If-None-Match: *`` of S3), ``put_if_match`` (compare-and-swap on the ETag: ``If-Match``),
``list`` and ``delete``. Keys are ``/``-separated and relative to the store's base.

- :class:`LocalStore`: a folder. Writes go to a fsynced temp file, then ``link`` (create
  only, atomic) or ``rename`` (replace), then the folder is fsynced; compare-and-swap holds
  an ``flock`` on ``<root>/.objectstore.lock``. The ETag is the content's sha256.
- :class:`S3ObjectStore`, :class:`GCSObjectStore`, :class:`AzureObjectStore`: S3 (and
  S3-compatible servers), Google Cloud Storage and Azure Blob Storage through ``obstore``
  (the Rust ``object_store`` crate), whose ``PutMode`` maps to the conditional headers
  above. One base class maps obstore's errors for all three.
- :class:`RetryingStore`: retries the reads (``get``, ``list``) of another store on
  transient errors with bounded exponential backoff.

:func:`open_store` takes a location (a path, ``s3://bucket/prefix``, ``gs://bucket/prefix``
or ``az://container/prefix``) and the ``object_store`` settings. Credentials never pass
through this module's ``repr`` or logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, S3Store

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.errors import StreamTrainerError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

URL_SCHEMES = ("s3", "gs", "az")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# obstore reports an HTTP answer as "... status code: 404 Not Found: <xml><Code>NoSuchBucket"
_STATUS = re.compile(r"status code: (\d{3})")
_S3_CODE = re.compile(r"<Code>([^<]+)</Code>")
_S3_MESSAGE = re.compile(r"<Message>([^<]+)</Message>")
# Credentials obstore may read from the environment: redacted from construction errors.
_CREDENTIAL_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_BEARER_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
)
_TMP_PREFIX = ".tmp-"
_LOCK_FILE = ".objectstore.lock"

# The operations of the protocol, the only values a RequestObserver's operation takes.
OPERATIONS = ("get", "put", "put_if_absent", "put_if_match", "list", "delete")
# Told of every request: (operation, seconds, failed). ``failed`` is True when the store
# failed it (ObjectStoreError itself); a missing key or a refused conditional write is an
# answer. E.g. :meth:`stream_trainer.operations.metrics.Metrics.observe_object_store`.
RequestObserver = Callable[[str, float, bool], None]


class ObjectStoreError(StreamTrainerError):
    """An object-store operation failed (network, permissions, bad URL)."""


class ObjectNotFound(ObjectStoreError):
    """The key does not exist."""


class ObjectStoreRefused(ObjectStoreError):
    """The store answered and refused the request for good (bad credentials, no such
    bucket, no permission: an HTTP 4xx other than 408 / 429). Retrying will not help."""


class ObjectExists(ObjectStoreError):
    """``put_if_absent`` refused: the key already exists (it was not changed)."""


class PreconditionFailed(ObjectStoreError):
    """``put_if_match`` refused: the object changed since its ETag was read (or is gone)."""


@dataclass(frozen=True)
class StoredObject:
    """An object's bytes and the ETag to pass to :meth:`ObjectStore.put_if_match`."""

    data: bytes
    etag: str


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    key: str
    size: int


class ObjectStore(Protocol):
    """Keys and bytes with conditional writes; see the module docstring."""

    @property
    def url(self) -> str:
        """The base location as a URL (``file:///…`` or ``s3://bucket/prefix``)."""
        ...

    def url_of(self, key: str) -> str:
        """The URL of ``key`` (what version events carry)."""
        ...

    def get(self, key: str) -> StoredObject:
        """The object; raises ObjectNotFound."""
        ...

    def put(self, key: str, data: bytes) -> str:
        """Write (replacing any object) atomically; returns the new ETag."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create ``key``; raises ObjectExists, changing nothing, when it exists."""
        ...

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace ``key`` only if its ETag is still ``etag``; raises PreconditionFailed."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder: end it with ``/``)."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...


def is_store_url(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` locations (object stores), False for local paths."""
    return isinstance(location, str) and bool(_URL.match(location))


def parse_store_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)`` of ``s3://bucket/prefix``, ``gs://bucket/prefix`` or
    ``az://container/prefix`` (scheme lower-cased, prefix without slashes at either end,
    possibly empty); raises ObjectStoreError for anything else."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ObjectStoreError(
            f"unsupported store URL {url!r}: use a local path, s3://bucket/prefix, "
            "gs://bucket/prefix or az://container/prefix"
        )
    # No user:password@ or :port: credentials never come from a URL.
    if not parsed.netloc or "@" in parsed.netloc or ":" in parsed.netloc:
        raise ObjectStoreError(f"store URL {url!r}: expected {scheme}://bucket[/prefix]")
    if parsed.query or parsed.fragment:
        raise ObjectStoreError(f"store URL {url!r}: expected {scheme}://bucket[/prefix]")
    return scheme, parsed.netloc, parsed.path.strip("/")


def is_transient(error: ObjectStoreError) -> bool:
    """True when retrying ``error`` may succeed (network, timeout, 5xx, 408, 429): not a
    missing key, not a refusal, not a conditional write's answer."""
    answers = ObjectNotFound | ObjectStoreRefused | ObjectExists | PreconditionFailed
    return not isinstance(error, answers)


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """An :class:`ObjectStore` on a local folder (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def url_of(self, key: str) -> str:
        return self._path(key).as_uri()

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts):
            raise ObjectStoreError(f"invalid key {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str) -> StoredObject:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url_of(key)}: not found") from None
        except OSError as error:
            raise ObjectStoreError(f"{self.url_of(key)}: {error}") from error
        return StoredObject(data, _etag(data))

    def _temp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        tmp = self._temp(path, data)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return _etag(data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        path = self._path(key)
        tmp = self._temp(path, data)
        try:
            # link() fails when the name exists: create-only, atomic, and the file it
            # publishes is already complete and durable.
            os.link(tmp, path)
        except FileExistsError:
            raise ObjectExists(f"{self.url_of(key)} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return _etag(data)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / _LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        with self._locked():
            try:
                current = self.get(key).etag
            except ObjectNotFound:
                raise PreconditionFailed(f"{self.url_of(key)}: gone") from None
            if current != etag:
                raise PreconditionFailed(f"{self.url_of(key)}: changed since it was read")
            return self.put(key, data)

    def list(self, prefix: str) -> list[ObjectInfo]:
        folder = prefix.rpartition("/")[0]
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        found = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(_TMP_PREFIX) or name == _LOCK_FILE:
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)


class _ObstoreStore:
    """An :class:`ObjectStore` over an obstore store; maps obstore's errors to ours the
    same way for every scheme. Subclasses name the scheme. ``observe``, when given, is told
    of every request (its operation, duration and whether the store failed it)."""

    scheme = ""

    def __init__(
        self,
        url: str,
        store: S3Store | GCSStore | AzureStore,
        observe: RequestObserver | None = None,
    ) -> None:
        scheme, self._bucket, self._prefix = parse_store_url(url)
        if scheme != self.scheme:
            raise ObjectStoreError(f"{type(self).__name__} needs a {self.scheme}:// URL: {url!r}")
        self._store = store
        self._observe = observe

    @contextlib.contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        if self._observe is None:
            yield
            return
        started = time.perf_counter()
        failed = False
        try:
            yield
        except ObjectStoreError as error:
            # "exists", "not found" and "changed" are the store's answers; anything else
            # (unreachable, 5xx, a refusal such as 403) is a failure.
            failed = not isinstance(error, ObjectExists | ObjectNotFound | PreconditionFailed)
            raise
        finally:
            self._observe(operation, time.perf_counter() - started, failed)

    def __repr__(self) -> str:
        # Never the obstore object: its config holds the credentials.
        return f"{type(self).__name__}({self.url!r})"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._bucket}/{self._prefix}".rstrip("/")

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _fail(self, key: str, error: Exception) -> ObjectStoreError:
        # obstore appends a multi-line "Debug source" dump: the first part says it all.
        message = str(error).split("\n\nDebug source", 1)[0].strip()
        status = _STATUS.search(message)
        code = int(status.group(1)) if status else None
        refused = isinstance(error, PermissionDeniedError | UnauthenticatedError) or (
            code is not None and 400 <= code < 500 and code not in (408, 429)
        )
        if refused:
            # The server's own code and message (NoSuchBucket, InvalidAccessKeyId, ...) say
            # the cause; the rest is the request line and an XML dump.
            found, said = _S3_CODE.search(message), _S3_MESSAGE.search(message)
            cause = f"HTTP {code}" if code else type(error).__name__
            if found:
                cause += f" {found.group(1)}"
                detail = said.group(1) if said else ""
            else:
                detail = message
            return ObjectStoreRefused(f"{self.url_of(key)}: refused ({cause}): {detail}")
        return ObjectStoreError(f"{self.url_of(key)}: {type(error).__name__}: {message}")

    def get(self, key: str) -> StoredObject:
        with self._timed("get"):
            try:
                result = obstore.get(self._store, key)
                data = bytes(result.bytes())
            except FileNotFoundError:  # what obstore raises for a missing key
                raise ObjectNotFound(f"{self.url_of(key)}: not found") from None
            except Exception as error:
                raise self._fail(key, error) from error
        return StoredObject(data, result.meta.get("e_tag") or "")

    def _put(self, key: str, data: bytes, mode: object, operation: str) -> str:
        with self._timed(operation):
            return self._put_untimed(key, data, mode)

    def _put_untimed(self, key: str, data: bytes, mode: object) -> str:
        try:
            result = obstore.put(self._store, key, data, mode=mode)  # type: ignore[arg-type]
        except AlreadyExistsError:
            raise ObjectExists(f"{self.url_of(key)} already exists") from None
        except PreconditionError:
            if mode == "create":  # some servers answer 412 to If-None-Match
                raise ObjectExists(f"{self.url_of(key)} already exists") from None
            raise PreconditionFailed(f"{self.url_of(key)}: changed since it was read") from None
        except Exception as error:
            raise self._fail(key, error) from error
        return result.get("e_tag") or ""

    def put(self, key: str, data: bytes) -> str:
        return self._put(key, data, "overwrite", "put")

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self._put(key, data, "create", "put_if_absent")

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return self._put(key, data, {"e_tag": etag}, "put_if_match")

    def list(self, prefix: str) -> list[ObjectInfo]:
        with self._timed("list"):
            try:
                found = [
                    ObjectInfo(meta["path"], int(meta["size"]))
                    for chunk in obstore.list(self._store, prefix or None)
                    for meta in chunk
                    if meta["path"].startswith(prefix)
                ]
            except Exception as error:
                raise self._fail(prefix, error) from error
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        with self._timed("delete"):
            try:
                obstore.delete(self._store, key)
            except FileNotFoundError:  # what obstore raises for a missing key
                return
            except Exception as error:
                raise self._fail(key, error) from error


class S3ObjectStore(_ObstoreStore):
    """An :class:`ObjectStore` on ``s3://bucket/prefix`` (any S3-compatible server whose
    PUT honours ``If-None-Match: *`` and ``If-Match``)."""

    scheme = "s3"


class GCSObjectStore(_ObstoreStore):
    """An :class:`ObjectStore` on ``gs://bucket/prefix`` (Google Cloud Storage: create-only
    and compare-and-swap through its generation preconditions). Untested against GCS."""

    scheme = "gs"


class AzureObjectStore(_ObstoreStore):
    """An :class:`ObjectStore` on ``az://container/prefix`` (Azure Blob Storage, the account
    from ``AZURE_STORAGE_ACCOUNT_NAME``). Untested against Azure."""

    scheme = "az"


class RetryingStore:
    """Another store whose reads (``get``, ``list``) are retried on transient errors
    (:func:`is_transient`): waits ``first_delay_s``, doubling up to ``max_delay_s``, for at
    most ``retry_for_s`` in all; then the last error is raised. A missing key or a refusal
    is raised at once. Writes are passed through untried-again: a conditional write whose
    answer was lost cannot be repeated safely. ``on_retry(error, delay)`` is called before
    each wait; ``stop`` (set) ends the waiting early with the last error.
    """

    def __init__(
        self,
        inner: ObjectStore,
        *,
        retry_for_s: float = 60.0,
        first_delay_s: float = 0.5,
        max_delay_s: float = 10.0,
        on_retry: Callable[[ObjectStoreError, float], None] | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.inner = inner
        self.retry_for_s = retry_for_s
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.on_retry = on_retry
        self._stop = stop or threading.Event()
        self._clock = clock or time.monotonic

    def __repr__(self) -> str:
        return f"RetryingStore({self.inner!r})"

    @property
    def url(self) -> str:
        return self.inner.url

    def url_of(self, key: str) -> str:
        return self.inner.url_of(key)

    def _retried(self, call: Callable[[], _T]) -> _T:
        deadline = self._clock() + self.retry_for_s
        delay = self.first_delay_s
        while True:
            try:
                return call()
            except ObjectStoreError as error:
                left = deadline - self._clock()
                if not is_transient(error) or left <= 0:
                    raise
                wait = min(delay, left)
                if self.on_retry is not None:
                    self.on_retry(error, wait)
                else:
                    log.warning("object store unavailable, retrying in %.1f s: %s", wait, error)
                if self._stop.wait(wait):
                    raise
                delay = min(delay * 2, self.max_delay_s)

    def get(self, key: str) -> StoredObject:
        return self._retried(lambda: self.inner.get(key))

    def list(self, prefix: str) -> list[ObjectInfo]:
        return self._retried(lambda: self.inner.list(prefix))

    def put(self, key: str, data: bytes) -> str:
        return self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self.inner.put_if_absent(key, data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return self.inner.put_if_match(key, data, etag)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def _read_file(path: Path | None) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path is not None else None


def _redact(message: str, secrets: list[str]) -> str:
    for value in secrets:
        if value:
            message = message.replace(value, "***")
    return message


def _client_options(cfg: ObjectStoreSettings) -> dict[str, str | bool]:
    client: dict[str, str | bool] = {"timeout": f"{cfg.timeout_seconds}s"}
    if cfg.endpoint_url and cfg.endpoint_url.lower().startswith("http://"):
        client["allow_http"] = True
    if cfg.ca_file is not None:
        client["root_certificate"] = cfg.ca_file.read_text(encoding="utf-8")
    return client


def open_store(
    location: Path | str,
    settings: ObjectStoreSettings | None = None,
    observe: RequestObserver | None = None,
) -> ObjectStore:
    """The store at ``location``: a :class:`LocalStore` for a path, else the obstore-backed
    store of its URL (``s3://``, ``gs://``, ``az://``) configured by ``settings`` and told
    of each request through ``observe`` (a folder's calls are not observed).

    S3 credentials come from ``settings``' ``*_file`` fields when set, else from what the
    AWS SDKs read (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
    web identity token files, container and instance metadata). GCS and Azure credentials
    come only from what obstore reads from the environment (``GOOGLE_APPLICATION_CREDENTIALS``,
    ``GOOGLE_SERVICE_ACCOUNT``, the metadata server / workload identity; ``AZURE_STORAGE_*``,
    ``AZURE_CLIENT_ID`` + ``AZURE_FEDERATED_TOKEN_FILE``, managed identity); for them only
    ``endpoint_url`` (an emulator), ``ca_file`` and ``timeout_seconds`` apply, and the
    S3 key files are refused. No I/O happens here beyond reading those files; the first
    request connects.
    """
    if not is_store_url(location):
        return LocalStore(Path(location))
    url = str(location)
    scheme, bucket, prefix = parse_store_url(url)
    cfg = settings or ObjectStoreSettings()
    secrets = [os.environ.get(name, "") for name in _CREDENTIAL_ENV]
    # obstore retries for up to 3 minutes by default: a store outage would then hold the
    # caller far longer than one request's bound. Retry within it instead.
    retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=cfg.timeout_seconds)}
    store: S3Store | GCSStore | AzureStore
    try:
        client = _client_options(cfg)
        if scheme == "s3":
            config: dict[str, str | bool] = {"virtual_hosted_style_request": not cfg.path_style}
            if cfg.endpoint_url:
                config["endpoint"] = cfg.endpoint_url
            if cfg.region:
                config["region"] = cfg.region
            for name, path in (
                ("access_key_id", cfg.access_key_id_file),
                ("secret_access_key", cfg.secret_access_key_file),
                ("session_token", cfg.session_token_file),
            ):
                value = _read_file(path)
                if value:
                    config[name] = value
                    secrets.append(value)
            store = S3Store(
                bucket,
                prefix=prefix or None,
                config=config,  # type: ignore[arg-type]
                client_options=client,  # type: ignore[arg-type]
                retry_config=retry,  # type: ignore[arg-type]
            )
        else:
            if cfg.access_key_id_file or cfg.session_token_file:
                raise ObjectStoreError(
                    f"{url}: object_store.access_key_id_file / secret_access_key_file / "
                    "session_token_file are S3 keys; gs:// and az:// take credentials "
                    "from the environment or workload identity"
                )
            if scheme == "gs":
                gcs: dict[str, str | bool] = {}
                if cfg.endpoint_url:  # an emulator such as fake-gcs-server
                    gcs["base_url"] = cfg.endpoint_url
                store = GCSStore(
                    bucket,
                    prefix=prefix or None,
                    config=gcs,  # type: ignore[arg-type]
                    client_options=client,  # type: ignore[arg-type]
                    retry_config=retry,  # type: ignore[arg-type]
                )
            else:
                azure: dict[str, str | bool] = {}
                if cfg.endpoint_url:  # an emulator such as Azurite, or a sovereign cloud
                    azure["endpoint"] = cfg.endpoint_url
                store = AzureStore(
                    bucket,
                    prefix=prefix or None,
                    config=azure,  # type: ignore[arg-type]
                    client_options=client,  # type: ignore[arg-type]
                    retry_config=retry,  # type: ignore[arg-type]
                )
    except ObjectStoreError:
        raise
    except Exception as error:
        # from None, and the message redacted: the failing config may hold a credential.
        message = _redact(str(error).split("\n\nDebug source", 1)[0].strip(), secrets)
        raise ObjectStoreError(f"{url}: {type(error).__name__}: {message}") from None
    kind = {"s3": S3ObjectStore, "gs": GCSObjectStore, "az": AzureObjectStore}[scheme]
    return kind(url, store, observe)


def split_object_url(url: str) -> tuple[str, str]:
    """``(store URL, key)`` of an object URL: ``s3://bucket/a/b`` gives
    ``("s3://bucket", "a/b")``; raises ObjectStoreError without a key."""
    scheme, bucket, key = parse_store_url(url)
    if not key:
        raise ObjectStoreError(f"{url!r} names a bucket, not an object")
    return f"{scheme}://{bucket}", key
