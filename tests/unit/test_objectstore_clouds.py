"""gs:// and az:// stores without a server (none runs here): construction without I/O, the
settings that apply to them, secrets kept out of errors, and obstore's errors mapped to
ours exactly as for S3 (one shared mapping). Also RetryingStore's bounded retries."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.exceptions import (
    AlreadyExistsError,
    GenericError,
    PermissionDeniedError,
    PreconditionError,
)

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.state import objectstore
from stream_trainer.state.objectstore import (
    AzureObjectStore,
    GCSObjectStore,
    LocalStore,
    ObjectExists,
    ObjectNotFound,
    ObjectStoreError,
    ObjectStoreRefused,
    PreconditionFailed,
    RetryingStore,
    S3ObjectStore,
    is_transient,
    open_store,
)

AZURE_ACCOUNT = "AZURE_STORAGE_ACCOUNT_NAME"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No cloud credentials from the machine running the tests."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT", AZURE_ACCOUNT):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_gs_url_opens_a_gcs_store_without_io(clean_env: pytest.MonkeyPatch) -> None:
    store = open_store("gs://models/prod", ObjectStoreSettings(timeout_seconds=1.0))
    assert isinstance(store, GCSObjectStore)
    assert store.url == "gs://models/prod"
    assert store.url_of("m/versions/00000001/model.pkl") == (
        "gs://models/prod/m/versions/00000001/model.pkl"
    )
    assert repr(store) == "GCSObjectStore('gs://models/prod')"


def test_az_url_opens_an_azure_store_with_the_account_from_the_environment(
    clean_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ObjectStoreError, match="Account must be specified"):
        open_store("az://container/p")
    clean_env.setenv(AZURE_ACCOUNT, "acct")
    secret = "c2VjcmV0LWF6dXJlLWtleQ=="
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_KEY", secret)
    store = open_store("az://container/p", ObjectStoreSettings(endpoint_url="http://127.0.0.1:1"))
    assert isinstance(store, AzureObjectStore)
    assert store.url == "az://container/p"
    assert secret not in repr(store) and "acct" not in repr(store)


def test_s3_key_files_are_refused_for_gs_and_az(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("AKID")
    (tmp_path / "secret").write_text("s3cr3t")
    settings = ObjectStoreSettings(
        access_key_id_file=tmp_path / "id", secret_access_key_file=tmp_path / "secret"
    )
    for url in ("gs://b/p", "az://c/p"):
        with pytest.raises(ObjectStoreError, match="S3 keys") as caught:
            open_store(url, settings)
        assert "s3cr3t" not in str(caught.value)


def test_a_construction_error_never_shows_an_environment_credential(
    clean_env: pytest.MonkeyPatch,
) -> None:
    secret = "dG9wLXNlY3JldC1rZXktdmFsdWU="
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_KEY", secret)
    clean_env.setenv("AZURE_STORAGE_SAS_KEY", secret)
    with pytest.raises(ObjectStoreError) as caught:
        open_store("az://container/p")  # no account: construction fails
    assert secret not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def _stores(monkeypatch: pytest.MonkeyPatch) -> list[objectstore._ObstoreStore]:
    monkeypatch.setenv(AZURE_ACCOUNT, "acct")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    stores = [open_store(url) for url in ("s3://b/p", "gs://b/p", "az://b/p")]
    assert [type(s) for s in stores] == [S3ObjectStore, GCSObjectStore, AzureObjectStore]
    return stores  # type: ignore[return-value]


def _raising(error: BaseException) -> Callable[..., Any]:
    def call(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    return call


_NO_BUCKET = (
    "Generic S3 error: Error performing list request: Server returned non-2xx status code: "
    "404 Not Found: <Error><Code>NoSuchBucket</Code></Error>\n\nDebug source: ..."
)


@pytest.mark.parametrize(
    ("operation", "raised", "expected"),
    [
        ("get", FileNotFoundError("Object at location k not found"), ObjectNotFound),
        ("create", AlreadyExistsError("exists"), ObjectExists),
        ("create", PreconditionError("412"), ObjectExists),  # 412 to If-None-Match
        ("match", PreconditionError("412"), PreconditionFailed),
        ("get", PermissionDeniedError("403"), ObjectStoreRefused),
        ("list", GenericError(_NO_BUCKET), ObjectStoreRefused),
        ("get", GenericError("HTTP error: error sending request"), ObjectStoreError),
        ("get", GenericError("non-2xx status code: 503 Service Unavailable"), ObjectStoreError),
        ("get", GenericError("non-2xx status code: 429 Too Many Requests"), ObjectStoreError),
    ],
)
def test_obstore_errors_map_the_same_way_for_every_scheme(
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
    raised: BaseException,
    expected: type[ObjectStoreError],
) -> None:
    for store in _stores(monkeypatch):
        monkeypatch.setattr(obstore, "get", _raising(raised))
        monkeypatch.setattr(obstore, "put", _raising(raised))
        monkeypatch.setattr(obstore, "list", _raising(raised))
        calls: dict[str, Callable[[], object]] = {
            "get": functools.partial(store.get, "k"),
            "create": functools.partial(store.put_if_absent, "k", b"x"),
            "match": functools.partial(store.put_if_match, "k", b"x", "etag"),
            "list": functools.partial(store.list, "m/"),
        }
        with pytest.raises(ObjectStoreError) as caught:
            calls[operation]()
        assert type(caught.value) is expected, (store, caught.value)
        assert str(caught.value).startswith(store.url), caught.value
        assert "Debug source" not in str(caught.value)
        transient = expected is ObjectStoreError
        assert is_transient(caught.value) is transient
    if operation == "list":
        assert "NoSuchBucket" in str(caught.value)


class _Flaky(LocalStore):
    """A folder whose reads fail ``failures`` times with ``error`` first."""

    def __init__(self, root: Path, failures: int, error: ObjectStoreError) -> None:
        super().__init__(root)
        self.failures, self.error, self.calls = failures, error, 0

    def get(self, key: str) -> objectstore.StoredObject:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return super().get(key)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Stop(threading.Event):
    """A stop event whose wait advances a fake clock instead of sleeping."""

    def __init__(self, clock: _Clock, waits: list[float]) -> None:
        super().__init__()
        self.clock, self.waits = clock, waits

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        self.clock.now += timeout
        return self.is_set()


def _retrying(inner: LocalStore, retry_for_s: float) -> tuple[RetryingStore, list[float]]:
    clock, waits = _Clock(), list[float]()
    retries: list[float] = []
    store = RetryingStore(
        inner,
        retry_for_s=retry_for_s,
        first_delay_s=0.5,
        max_delay_s=4.0,
        on_retry=lambda _error, delay: retries.append(delay),
        stop=_Stop(clock, waits),
        clock=clock,
    )
    return store, retries


def test_retrying_store_backs_off_exponentially_until_a_read_succeeds(tmp_path: Path) -> None:
    inner = _Flaky(tmp_path, 5, ObjectStoreError("s3://b/k: connection refused"))
    inner.put("k", b"v")
    store, retries = _retrying(inner, 60.0)
    assert store.get("k").data == b"v"
    assert retries == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubled, capped


def test_retrying_store_gives_up_after_its_bound(tmp_path: Path) -> None:
    inner = _Flaky(tmp_path, 1000, ObjectStoreError("s3://b/k: connection refused"))
    store, retries = _retrying(inner, 5.0)
    with pytest.raises(ObjectStoreError, match="connection refused"):
        store.get("k")
    assert sum(retries) == pytest.approx(5.0)  # the last wait is cut to the bound


@pytest.mark.parametrize(
    "error", [ObjectNotFound("s3://b/k: not found"), ObjectStoreRefused("s3://b: refused")]
)
def test_retrying_store_raises_a_missing_key_or_a_refusal_at_once(
    tmp_path: Path, error: ObjectStoreError
) -> None:
    inner = _Flaky(tmp_path, 1000, error)
    store, retries = _retrying(inner, 60.0)
    with pytest.raises(type(error)):
        store.get("k")
    assert (retries, inner.calls) == ([], 1)
