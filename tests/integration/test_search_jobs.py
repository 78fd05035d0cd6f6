"""Distributed search trials: worker processes started exactly as the chart's Job starts its
pods (command, arguments, environment), sharing one Optuna study in a real PostgreSQL.

The Job is the one the service would create: the chart's rendered template made into one
search's Job by :func:`stream_trainer.training.search.kube_jobs.job_manifest`. Locally, a pod's
mounts become
files in a temporary folder (the config file, the checkpoint key and database URL Secrets,
the snapshot claim) and ``JOB_COMPLETION_INDEX`` is set as Kubernetes sets it in an Indexed
Job; the image's entry point ``stream-trainer`` is ``python -m stream_trainer``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import numpy as np
import pytest
import yaml

from stream_trainer.config import settings_from_mapping
from stream_trainer.training.learners import build_model
from stream_trainer.training.search.jobs import JobSearch, JobSearchCancelled
from stream_trainer.training.search.kube_jobs import job_manifest
from stream_trainer.training.search.search import SearchFailed, search_spec, validation_start
from stream_trainer.training.search.snapshot import Snapshot, write_snapshot
from stream_trainer.training.search.study import (
    ATTR_BUDGET,
    budget_used,
    create_study,
    fail_orphans,
    finished,
    load_study,
    run_worker,
    summary_from_study,
)
from tests.postgres_env import Postgres

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "stream-trainer"
TRIALS = 16
WORKERS = 2
KEY = "k3y-for-the-search-snapshot-0123456789"


def _render(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chart's search Job template and the service's config file."""
    with helm.Chart.load(CHART_DIR) as chart:
        files = chart.render(values, name="fraud", namespace="ml", is_install=True)
    docs = [
        d
        for path, text in files.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    (template,) = [
        yaml.safe_load(m["data"]["search-job.yaml"]) for m in maps if "search-job.yaml" in m["data"]
    ]
    (config,) = [
        yaml.safe_load(m["data"]["config.yaml"]) for m in maps if "config.yaml" in m["data"]
    ]
    return template, config


VALUES: dict[str, Any] = {
    "config": {
        "record": {"features": ["f0", "f1"], "labels": [0, 1]},
        "model": {
            "name": "fraud",
            "preprocessing": [],
            "learner": {
                "path": "sklearn.ensemble.RandomForestClassifier",
                "params": {"n_estimators": 25, "max_depth": 1, "random_state": 0},
            },
        },
        "training": {
            "mode": "full_batch",
            "full_batch": {
                "search": {
                    "enabled": True,
                    "algorithm": "tpe",
                    "space": {"learner.max_depth": {"type": "int", "low": 1, "high": 12}},
                    "trials": TRIALS,
                }
            },
        },
    },
    "search": {
        "jobs": {
            "enabled": True,
            "parallelism": WORKERS,
            "databaseUrl": {"existingSecret": "search-db", "key": "url"},
            "snapshots": {"existingClaim": "search-snapshots"},
        }
    },
}


class PodFiles:
    """A pod's mounts as local files: every mount path maps to a folder under ``root``."""

    def __init__(self, root: Path, pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
        self.root = root
        self.mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        self.volumes = {v["name"]: v for v in pod_spec["volumes"]}

    def local(self, path: str) -> Path:
        """Where a path inside the pod is on this machine (under its mount's folder)."""
        mount: str
        for mount in sorted(self.mounts, key=len, reverse=True):
            if path == mount or path.startswith(mount + "/"):
                return Path(self.root, mount.strip("/"), path[len(mount) :].lstrip("/"))
        raise AssertionError(f"{path} is not under any mount of the pod")

    def substitute(self, value: str) -> str:
        """A pod path in an argument or env value made local."""
        return str(self.local(value)) if value.startswith("/") else value


def _key_from_secret(mount: dict[str, Any], volume: dict[str, Any]) -> str:
    return f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"


@pytest.fixture
def job_setup(postgres: Postgres, tmp_path: Path) -> dict[str, Any]:
    """The study, the snapshot and the service's Job, with the pods' files laid out."""
    template, config = _render(VALUES)
    url = postgres.new_database()
    name = f"fraud-search-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    pod_spec = template["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    files = PodFiles(tmp_path / "pod", pod_spec, container)
    # The Secrets' mounted files, and the config file the ConfigMap mounts.
    secret_files: dict[str, str] = {}
    for mount in container["volumeMounts"]:
        volume = files.volumes[mount["name"]]
        if "secret" in volume:
            secret_files[volume["secret"]["secretName"]] = _key_from_secret(mount, volume)
    files.local(secret_files["search-db"]).parent.mkdir(parents=True)
    files.local(secret_files["search-db"]).write_text(url + "\n", encoding="utf-8")
    ck_secret = (
        VALUES.get("secrets", {})
        .get("checkpointKey", {})
        .get("existingSecret", "stream-trainer-checkpoint-key")
    )
    files.local(secret_files[ck_secret]).parent.mkdir(parents=True)
    files.local(secret_files[ck_secret]).write_text(KEY, encoding="utf-8")
    local_config = dict(config)
    local_config["checkpoint"] = {
        **config["checkpoint"],
        "hmac_key_file": str(files.local(config["checkpoint"]["hmac_key_file"])),
    }
    config_path = files.local("/etc/stream-trainer/config.yaml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(local_config), encoding="utf-8")
    # What the service does before it creates the Job: the snapshot, then the study.
    settings = settings_from_mapping(config, env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": KEY})
    spec = search_spec(settings)
    assert spec is not None
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6000, 2))
    y = ((X[:, 0] * X[:, 1]) > 0).astype(np.int64)  # needs depth: a stump is at chance
    start = validation_start(len(y), spec.validation_fraction)
    snapshot = Snapshot(
        build_model(settings), (X[:start], y[:start], None), (X[start:], y[start:]), spec
    )
    snapshot_dir = settings.training.full_batch.search.jobs.snapshot_dir
    path = write_snapshot(files.local(str(snapshot_dir)), snapshot, KEY.encode())
    sha256 = path.name[len("window-") : -len(".snap")]
    create_study(url, name, spec, sha256, [])
    job = job_manifest(template, name, name, snapshot_dir / path.name, WORKERS)
    return {
        "job": job,
        "files": files,
        "url": url,
        "password": postgres.password,
        "study": name,
        "snapshot": snapshot,
        "snapshot_path": path,
    }


def _pod_command(setup: dict[str, Any], index: int) -> tuple[list[str], dict[str, str]]:
    """Pod ``index`` of the Job as a local process: its args and env, paths made local."""
    job, files = setup["job"], setup["files"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "command" not in container  # the image's entry point: stream-trainer
    args = [files.substitute(a) for a in container["args"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_TRAINER_")}
    for item in container["env"]:
        assert "value" in item, f"{item['name']}: a secretKeyRef has no local stand-in here"
        env[item["name"]] = files.substitute(item["value"]) if item["name"] != "TMPDIR" else "/tmp"
    env["JOB_COMPLETION_INDEX"] = str(index)  # set by Kubernetes in an Indexed Job's pods
    return [sys.executable, "-m", "stream_trainer", *args], env


def test_job_pods_as_processes_finish_one_study_together(job_setup: dict[str, Any]) -> None:
    assert job_setup["job"]["spec"]["parallelism"] == WORKERS
    started = time.monotonic()
    processes = []
    for index in range(WORKERS):
        command, env = _pod_command(job_setup, index)
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in processes]
    seconds = time.monotonic() - started
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
        # The database URL holds a password: never in a worker's output.
        assert job_setup["password"] not in out + err
    reports = [json.loads(out) for out, _ in outputs]
    study = load_study(job_setup["url"], job_setup["study"])
    trials = study.get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    states = {t.state.name for t in trials}
    by_worker: dict[str, int] = {}
    for trial in trials:
        by_worker[trial.user_attrs["worker"]] = by_worker.get(trial.user_attrs["worker"], 0) + 1
    print(
        f"\n{WORKERS} workers finished {len(trials)} trials in {seconds:.1f} s "
        f"(trials per worker {sorted(by_worker.values())})"
    )
    assert numbers == list(range(TRIALS)), "exactly the budget, each trial number once"
    assert states == {"COMPLETE"}
    assert len(by_worker) == WORKERS, f"every worker ran trials: {by_worker}"
    assert sorted(r["complete"] for r in reports) == sorted(by_worker.values())
    summary = summary_from_study(study, job_setup["snapshot"], duration_s=seconds)
    best = summary.best()
    assert best is not None
    # Worker 0 scored the snapshot's own params (a depth-1 forest at chance on XOR).
    assert summary.baseline_score < 0.6 < best.score
    assert best.params["learner.max_depth"] >= 2


def test_a_tampered_snapshot_is_refused_before_any_trial(job_setup: dict[str, Any]) -> None:
    path: Path = job_setup["snapshot_path"]
    data = bytearray(path.read_bytes())
    data[len(b"STSNAP1\n") + 4 + 10] ^= 0x01  # one bit of the signed manifest
    path.write_bytes(bytes(data))
    command, env = _pod_command(job_setup, 0)
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert "bad signature" in result.stderr
    assert "refusing to load it" in result.stderr
    assert load_study(job_setup["url"], job_setup["study"]).get_trials(deepcopy=False) == []


def test_a_worker_without_the_database_url_says_where_it_comes_from(
    job_setup: dict[str, Any],
) -> None:
    command, env = _pod_command(job_setup, 0)
    env.pop("STREAM_TRAINER_SEARCH_DATABASE_URL_FILE")
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert "STREAM_TRAINER_SEARCH_DATABASE_URL" in result.stderr
    assert "never read from the config file" in result.stderr


def test_a_dead_pods_running_trial_is_failed_when_the_job_ends(job_setup: dict[str, Any]) -> None:
    """A pod killed mid-trial leaves its trial running; the budget counts it, and once the
    Job has ended the service marks it failed, so the study is finished."""
    url, name = job_setup["url"], job_setup["study"]
    study = load_study(url, name)
    study.set_user_attr(ATTR_BUDGET, 2)
    study.ask()  # claimed by a pod that then died: RUNNING forever
    command, env = _pod_command(job_setup, 1)
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["complete"] == 1  # the budget minus the orphan
    study = load_study(url, name)
    assert budget_used(study) and not finished(study)
    assert fail_orphans(study) == 1
    assert finished(study)
    summary = summary_from_study(study, job_setup["snapshot"], duration_s=0.0)
    assert summary.counts() == {"complete": 1, "failed": 1, "pruned": 0}
    (failed,) = [t for t in summary.trials if t.state == "failed"]
    assert failed.error == "its worker ended without finishing it"


class StubApi:
    """The Jobs API as the service sees it; ``on_create`` plays the Job's pods."""

    def __init__(self, state: str, on_create: Any = None) -> None:
        self.state, self.on_create = state, on_create
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []

    def create_job(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.created.append(manifest)
        if self.on_create is not None:
            self.on_create(manifest)
        return manifest

    def get_job(self, name: str) -> dict[str, Any] | None:
        if self.state == "running":
            return {"status": {}}
        return {"status": {"conditions": [{"type": self.state, "status": "True"}]}}

    def delete_job(self, name: str) -> None:
        self.deleted.append(name)


def _job_search(api: StubApi, template: dict[str, Any], tmp_path: Path, url: str) -> JobSearch:
    template_file = tmp_path / "search-job.yaml"
    template_file.write_text(yaml.safe_dump(template), encoding="utf-8")
    return JobSearch(
        api=api,  # type: ignore[arg-type]
        template_file=template_file,
        snapshot_dir=tmp_path / "snapshots",
        parallelism=WORKERS,
        wait_timeout_s=60,
        poll_interval_s=0.05,
        key=KEY.encode(),
        prefix="fraud-search",
        environ={"STREAM_TRAINER_SEARCH_DATABASE_URL": url},
    )


def _refit(candidate: Any, X: Any, y: Any, weights: Any) -> tuple[Any, float]:
    candidate.fit(X, y, weights)
    return candidate, 0.0


def _window() -> tuple[Any, Any, Any]:
    settings = settings_from_mapping(
        _render(VALUES)[1], env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": KEY}
    )
    spec = search_spec(settings)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1500, 2))
    y = ((X[:, 0] * X[:, 1]) > 0).astype(np.int64)
    return build_model(settings), (X, y), spec


def test_job_search_refits_the_studys_winner(postgres: Postgres, tmp_path: Path) -> None:
    """JobSearch with the pods played in-process: the study's best params are refit."""
    url = postgres.new_database()
    template, _ = _render(VALUES)
    candidate, (X, y), spec = _window()

    def pods(manifest: dict[str, Any]) -> None:
        args = manifest["spec"]["template"]["spec"]["containers"][0]["args"]
        study, snapshot = args[args.index("--study") + 1], Path(args[args.index("--snapshot") + 1])
        run_worker(snapshot, study, url, KEY.encode(), index=0)

    api = StubApi("Complete", on_create=pods)
    winner, _seconds, summary = _job_search(api, template, tmp_path, url).run(
        candidate, X, y, None, spec, None, refit=_refit
    )
    (created,) = api.created
    assert api.deleted == [created["metadata"]["name"]] == [summary["job"]["name"]]
    assert summary["counts"] == {"complete": TRIALS, "failed": 0, "pruned": 0}
    assert summary["job"]["outcome"] == "finished"
    assert (
        winner.describe()["params"]["max_depth"] == summary["best"]["params"]["learner.max_depth"]
    )
    assert list((tmp_path / "snapshots").iterdir()) == []  # the window is not kept


def test_a_failed_job_ends_the_wait_with_the_reason(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.new_database()
    template, _ = _render(VALUES)
    candidate, (X, y), spec = _window()
    api = StubApi("Failed")
    with pytest.raises(SearchFailed, match=r"\(job failed\): no trial of 0 completed"):
        _job_search(api, template, tmp_path, url).run(
            candidate, X, y, None, spec, None, refit=_refit
        )
    assert api.deleted == [api.created[0]["metadata"]["name"]]


def test_cancel_stops_the_wait_and_deletes_the_job(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.new_database()
    template, _ = _render(VALUES)
    candidate, (X, y), spec = _window()
    api = StubApi("running")
    search = _job_search(api, template, tmp_path, url)
    search.cancel()  # as FullBatchTrainer.close does on SIGTERM
    with pytest.raises(JobSearchCancelled):
        search.run(candidate, X, y, None, spec, None, refit=_refit)
    assert api.deleted == [api.created[0]["metadata"]["name"]]
