"""The object-store layer without a server: the local store's conditional writes, URL
parsing, the settings' secret rules, and the store registry's contracts on a folder (the
same code runs against S3 in tests/integration/test_object_store.py)."""

from __future__ import annotations

import pickle
import socket
import threading
import time
from pathlib import Path

import pytest

from stream_trainer.config import ObjectStoreSettings, RegistrySettings, resolve_paths
from stream_trainer.publishing.registry import ModelRegistry, RegistryError, open_registry
from stream_trainer.publishing.store_registry import StoreRegistry
from stream_trainer.state.objectstore import (
    LocalStore,
    ObjectExists,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    S3ObjectStore,
    is_store_url,
    open_store,
    parse_store_url,
    split_object_url,
)

KEY = b"unit-key"


def test_local_put_if_absent_never_overwrites(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_if_absent("a/b", b"first")
    with pytest.raises(ObjectExists):
        store.put_if_absent("a/b", b"second")
    assert store.get("a/b").data == b"first"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]  # no temp file left


def test_local_put_if_absent_has_one_winner_under_a_race(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    wins: list[int] = []

    def attempt(n: int) -> None:
        try:
            store.put_if_absent("k", str(n).encode())
            wins.append(n)
        except ObjectExists:
            pass

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert store.get("k").data == str(wins[0]).encode()


def test_local_put_if_match_is_a_compare_and_swap(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    etag = store.put("lease", b"1")
    assert store.get("lease").etag == etag
    store.put_if_match("lease", b"2", etag)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("lease", b"3", etag)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("gone", b"x", etag)
    assert store.get("lease").data == b"2"


def test_local_list_get_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for key in ("v/1/a", "v/2/a", "w/1"):
        store.put(key, b"x")
    assert [info.key for info in store.list("v/")] == ["v/1/a", "v/2/a"]
    store.delete("v/1/a")
    store.delete("v/1/a")
    with pytest.raises(ObjectNotFound):
        store.get("v/1/a")
    with pytest.raises(ObjectStoreError):
        store.get("../escape")
    assert store.url_of("w/1") == (tmp_path / "w" / "1").as_uri()


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("s3://bucket", ("s3", "bucket", "")),
        ("s3://bucket/a/b/", ("s3", "bucket", "a/b")),
        ("gs://bucket/a/b", ("gs", "bucket", "a/b")),
        ("GS://bucket", ("gs", "bucket", "")),
        ("az://container/models/prod/", ("az", "container", "models/prod")),
    ],
)
def test_store_urls_parse(url: str, parts: tuple[str, str, str]) -> None:
    assert is_store_url(url)
    assert parse_store_url(url) == parts


@pytest.mark.parametrize(
    "url",
    [
        "hdfs://b/x",
        "s3:///x",
        "s3://b/x?versionId=1",
        "http://b/x",
        "gs://user:secret@b/x",  # credentials never come from a URL
        "az://c:443/x",
        "abfs://c/x",
    ],
)
def test_unsupported_store_urls_are_refused(url: str) -> None:
    with pytest.raises(ObjectStoreError):
        parse_store_url(url)


def test_object_urls_split_into_store_and_key() -> None:
    assert split_object_url("s3://b/p/m/versions/00000001/model.pkl") == (
        "s3://b",
        "p/m/versions/00000001/model.pkl",
    )
    with pytest.raises(ObjectStoreError):
        split_object_url("s3://b")


def test_registry_root_takes_store_urls_and_paths_and_refuses_other_schemes() -> None:
    assert RegistrySettings(root="s3://bucket/prefix").root == "s3://bucket/prefix"
    assert RegistrySettings(root="gs://bucket/prefix").root == "gs://bucket/prefix"
    assert RegistrySettings(root="az://container/p").root == "az://container/p"
    assert RegistrySettings(root="var/registry").root == Path("var/registry")
    with pytest.raises(ValueError, match="unsupported URL"):
        RegistrySettings(root="hdfs://bucket/prefix")


def test_relative_paths_resolve_but_urls_stay_as_written(tmp_path: Path) -> None:
    data = {"registry": {"root": "s3://bucket/p"}, "checkpoint": {"dir": "ckpt"}}
    resolved = resolve_paths(data, tmp_path)
    assert resolved["registry"]["root"] == "s3://bucket/p"
    assert resolved["checkpoint"]["dir"] == str(tmp_path / "ckpt")


def test_s3_keys_come_from_files_and_never_show(tmp_path: Path) -> None:
    key_id = tmp_path / "id"
    secret = tmp_path / "secret"
    key_id.write_text("AKIDEXAMPLE\n")
    secret.write_text("wJalrXUtnFEMI-very-secret\n")
    settings = ObjectStoreSettings(
        endpoint_url="http://127.0.0.1:1",
        path_style=True,
        access_key_id_file=key_id,
        secret_access_key_file=secret,
    )
    store = open_store("s3://bucket/prefix", settings)
    assert isinstance(store, S3ObjectStore)
    assert "very-secret" not in repr(store)
    assert "very-secret" not in repr(settings)
    assert store.url_of("k") == "s3://bucket/prefix/k"


def test_a_key_id_file_without_a_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        ObjectStoreSettings(access_key_id_file=tmp_path / "id")


def test_open_registry_picks_the_implementation_by_location(tmp_path: Path) -> None:
    assert isinstance(open_registry(tmp_path, "m", KEY, 3), ModelRegistry)
    assert isinstance(open_registry("s3://bucket/p", "m", KEY, 3), StoreRegistry)


# -- the store registry's contracts, on a folder ----------------------------------------


def store_registry(root: Path, keep_last: int = 3) -> StoreRegistry:
    return StoreRegistry(LocalStore(root), "m", KEY, keep_last)


def test_store_registry_publishes_verifies_and_reads_back(tmp_path: Path) -> None:
    registry = store_registry(tmp_path)
    info = registry.publish(pickle.dumps({"w": 1}), {"parent": None}, promote=True)
    assert info.version == 1
    assert info.artifact_uri == (tmp_path / "m/versions/00000001/model.pkl").as_uri()
    assert registry.champion() == info
    assert pickle.loads(registry.load_artifact(1)) == {"w": 1}
    (tmp_path / "m/versions/00000001/model.pkl").write_bytes(b"evil")
    with pytest.raises(RegistryError, match="sha256"):
        registry.load_artifact(1)


def test_store_registry_refuses_to_overwrite_a_version(tmp_path: Path) -> None:
    registry = store_registry(tmp_path)
    registry.publish(b"one", {}, promote=True)
    (tmp_path / "m" / "HIGH_WATER_MARK").unlink()
    (tmp_path / "m/versions/00000001/model.pkl").unlink()  # only the metadata remains
    stale = store_registry(tmp_path)
    stale._numbers = lambda: []  # type: ignore[method-assign]  # sees no version
    with pytest.raises(RegistryError, match="refusing to overwrite"):
        stale.publish(b"two", {}, promote=True)
    assert registry.get(1).metadata["artifact_bytes"] == 3


def test_store_registry_numbers_are_never_reused_and_retention_keeps_the_champion(
    tmp_path: Path,
) -> None:
    registry = store_registry(tmp_path, keep_last=2)
    registry.publish(b"1", {}, promote=True)
    for _ in range(3):
        registry.publish(b"n", {}, promote=False)
    assert [info.version for info in registry.list()] == [1, 3, 4]
    for number in (3, 4):
        registry.get(number)
    registry.promote(4, "manual")
    registry.promote(3, "manual")
    assert registry.rollback("undo").version == 4
    assert [e["action"] for e in registry.decisions()] == [
        "promote",
        "promote",
        "promote",
        "rollback",
    ]
    assert store_registry(tmp_path).next_version() == 5


def test_store_registry_recovers_an_interrupted_promotion(tmp_path: Path) -> None:
    registry = store_registry(tmp_path)
    registry.publish(b"1", {}, promote=True)
    real = registry._set_champion
    registry._set_champion = lambda *a, **k: None  # type: ignore[method-assign]
    registry.publish(b"2", {}, promote=True)  # crash: visible, champion pointer not moved
    registry._set_champion = real  # type: ignore[method-assign]
    assert registry.champion().version == 1  # type: ignore[union-attr]
    assert registry.recover() == 2
    assert registry.champion().version == 2  # type: ignore[union-attr]


def test_store_registry_event_markers(tmp_path: Path) -> None:
    registry = store_registry(tmp_path)
    info = registry.publish(b"1", {}, promote=True)
    assert not registry.event_sent(info)
    registry.mark_event_sent(info)
    assert registry.event_sent(info)


def test_an_unreachable_store_fails_within_the_configured_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Keys in the environment, so the request goes to the endpoint (not to instance metadata).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ObjectStoreSettings(
        endpoint_url=f"http://127.0.0.1:{port}", path_style=True, timeout_seconds=1.0
    )
    store = open_store("s3://bucket", settings)
    began = time.monotonic()
    with pytest.raises(ObjectStoreError):
        store.get("k")
    # Without the retry bound obstore keeps retrying for 3 minutes.
    assert time.monotonic() - began < 15.0
