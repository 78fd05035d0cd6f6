"""Where registries (and later checkpoints) keep their bytes: a local folder or an object store.

One small protocol, :class:`ObjectStore`, with the operations the guarantees need and no
more: ``get``, ``put`` (overwrite), ``put_if_absent`` (create only: never overwrites, the
``If-None-Match: *`` of S3), ``put_if_match`` (compare-and-swap on the ETag: ``If-Match``),
``list`` and ``delete``. Keys are ``/``-separated and relative to the store's base.

- :class:`LocalStore`: a folder. Writes go to a fsynced temp file, then ``link`` (create
  only, atomic) or ``rename`` (replace), then the folder is fsynced; compare-and-swap holds
  an ``flock`` on ``<root>/.objectstore.lock``. The ETag is the content's sha256.
- :class:`S3ObjectStore`: S3 and S3-compatible servers through ``obstore`` (the Rust
  ``object_store`` crate), whose ``PutMode`` maps to the conditional headers above.

:func:`open_store` takes a location (a path, or ``s3://bucket/prefix``) and the
``object_store`` settings. Credentials never pass through this module's ``repr`` or logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import S3Store

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.errors import StreamTrainerError

URL_SCHEMES = ("s3",)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_TMP_PREFIX = ".tmp-"
_LOCK_FILE = ".objectstore.lock"


class ObjectStoreError(StreamTrainerError):
    """An object-store operation failed (network, permissions, bad URL)."""


class ObjectNotFound(ObjectStoreError):
    """The key does not exist."""


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
    """``(scheme, bucket, prefix)`` of ``s3://bucket/prefix`` (prefix without slashes at
    either end, possibly empty); raises ObjectStoreError for anything else."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ObjectStoreError(
            f"unsupported store URL {url!r}: use a local path or s3://bucket/prefix"
        )
    if not parsed.netloc or parsed.query or parsed.fragment:
        raise ObjectStoreError(f"store URL {url!r}: expected s3://bucket[/prefix]")
    return scheme, parsed.netloc, parsed.path.strip("/")


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


class S3ObjectStore:
    """An :class:`ObjectStore` on ``s3://bucket/prefix`` (any S3-compatible server whose
    PUT honours ``If-None-Match: *`` and ``If-Match``)."""

    def __init__(self, url: str, store: S3Store) -> None:
        _, self._bucket, self._prefix = parse_store_url(url)
        self._store = store

    def __repr__(self) -> str:
        # Never the obstore object: its config holds the credentials.
        return f"S3ObjectStore({self.url!r})"

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}".rstrip("/")

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _fail(self, key: str, error: Exception) -> ObjectStoreError:
        # obstore appends a multi-line "Debug source" dump: the first part says it all.
        message = str(error).split("\n\nDebug source", 1)[0].strip()
        return ObjectStoreError(f"{self.url_of(key)}: {type(error).__name__}: {message}")

    def get(self, key: str) -> StoredObject:
        try:
            result = obstore.get(self._store, key)
            data = bytes(result.bytes())
        except FileNotFoundError:  # what obstore raises for a missing key
            raise ObjectNotFound(f"{self.url_of(key)}: not found") from None
        except Exception as error:
            raise self._fail(key, error) from error
        return StoredObject(data, result.meta.get("e_tag") or "")

    def _put(self, key: str, data: bytes, mode: object) -> str:
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
        return self._put(key, data, "overwrite")

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self._put(key, data, "create")

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return self._put(key, data, {"e_tag": etag})

    def list(self, prefix: str) -> list[ObjectInfo]:
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
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:  # what obstore raises for a missing key
            return
        except Exception as error:
            raise self._fail(key, error) from error


def _read_file(path: Path | None) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path is not None else None


def open_store(location: Path | str, settings: ObjectStoreSettings | None = None) -> ObjectStore:
    """The store at ``location``: a :class:`LocalStore` for a path, an
    :class:`S3ObjectStore` for ``s3://bucket/prefix`` configured by ``settings``.

    S3 credentials come from ``settings``' ``*_file`` fields when set, else from what the
    AWS SDKs read (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
    web identity token files, container and instance metadata). No I/O happens here
    beyond reading those files; the first request connects.
    """
    if not is_store_url(location):
        return LocalStore(Path(location))
    url = str(location)
    _, bucket, prefix = parse_store_url(url)
    cfg = settings or ObjectStoreSettings()
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
    secrets = [str(value) for key, value in config.items() if key != "virtual_hosted_style_request"]
    client: dict[str, str | bool] = {"timeout": f"{cfg.timeout_seconds}s"}
    if cfg.endpoint_url and cfg.endpoint_url.lower().startswith("http://"):
        client["allow_http"] = True
    if cfg.ca_file is not None:
        client["root_certificate"] = cfg.ca_file.read_text(encoding="utf-8")
    try:
        store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options=client,  # type: ignore[arg-type]
            # obstore retries for up to 3 minutes by default: a store outage would then
            # hold the caller far longer than one request's bound. Retry within it instead.
            retry_config={
                "max_retries": 3,
                "retry_timeout": timedelta(seconds=cfg.timeout_seconds),
            },
        )
    except Exception as error:
        # from None, and the message redacted: the failing config may hold a credential.
        message = str(error)
        for value in secrets:
            message = message.replace(value, "***")
        raise ObjectStoreError(f"{url}: {type(error).__name__}: {message}") from None
    return S3ObjectStore(url, store)


def split_object_url(url: str) -> tuple[str, str]:
    """``(store URL, key)`` of an object URL: ``s3://bucket/a/b`` gives
    ``("s3://bucket", "a/b")``; raises ObjectStoreError without a key."""
    scheme, bucket, key = parse_store_url(url)
    if not key:
        raise ObjectStoreError(f"{url!r} names a bucket, not an object")
    return f"{scheme}://{bucket}", key
