"""The test Schema Registry's build cache, without Maven or a JVM."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.testing import schema_registry


def _fake_built(app: Path, digest: str) -> None:
    app.mkdir(parents=True)
    (app / "quarkus-run.jar").write_bytes(b"jar")
    (app / ".complete").write_text(digest + "\n")


def test_a_complete_build_is_reused_without_maven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAM_TRAINER_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda _name: None)
    app = tmp_path / "apicurio-2.4.2" / "app"
    _fake_built(app, schema_registry._project_digest())
    assert schema_registry.build() == app


def test_an_edited_project_is_rebuilt_and_a_missing_maven_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAM_TRAINER_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda _name: None)
    _fake_built(tmp_path / "apicurio-2.4.2" / "app", "digest-of-an-older-pom")
    with pytest.raises(schema_registry.RegistryUnavailable, match="mvn not found"):
        schema_registry.build()


def test_concurrent_builds_run_maven_once_and_publish_by_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAM_TRAINER_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda _name: "/usr/bin/mvn")
    runs: list[list[str]] = []

    def fake_mvn(cmd: list[str], **_kwargs: Any) -> subprocess.CompletedProcess[str]:
        runs.append(cmd)
        scratch = Path(cmd[cmd.index("-f") + 1]).parent
        assert (scratch / "src/main/resources/application.properties").is_file()
        assert (scratch / "settings.xml").is_file() and "-s" in cmd
        built = scratch / "target" / "quarkus-app"
        built.mkdir(parents=True)
        (built / "quarkus-run.jar").write_bytes(b"jar")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("subprocess.run", fake_mvn)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(schema_registry.build())) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    home = tmp_path / "apicurio-2.4.2"
    assert len(runs) == 1 and results == [home / "app"] * 4
    assert (home / "app" / ".complete").read_text().strip() == schema_registry._project_digest()
    assert sorted(p.name for p in home.iterdir()) == [".lock", "app", "build.log"]  # no scratch


def test_a_failed_build_leaves_no_app_and_quotes_maven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAM_TRAINER_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda _name: "/usr/bin/mvn")
    monkeypatch.setattr(
        "subprocess.run",
        lambda cmd, **_kw: subprocess.CompletedProcess(cmd, 1, "", "[ERROR] Could not resolve x"),
    )
    with pytest.raises(schema_registry.RegistryUnavailable, match="Could not resolve x"):
        schema_registry.build()
    assert not (tmp_path / "apicurio-2.4.2" / "app").exists()


def test_the_maven_project_pins_what_the_issue_found() -> None:
    project = Path(schema_registry.__file__).parent / "apicurio"
    pom = (project / "pom.xml").read_text()
    for needle in (
        "<apicurio.version>2.4.2.Final</apicurio.version>",
        "<quarkus.version>2.16.4.Final</quarkus.version>",
        "<config-index.version>0.1.10.Final</config-index.version>",
        "<artifactId>everit-json-schema</artifactId>",
        "<goal>build</goal>",
        "<scope>import</scope>",
    ):
        assert needle in pom
    assert "<parent>" not in pom
    assert "<mirrorOf>*</mirrorOf>" in (project / "settings.xml").read_text()
    props = (project / "application.properties").read_text()
    assert "quarkus.index-dependency.registry-app.artifact-id=apicurio-registry-app" in props
