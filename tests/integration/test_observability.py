"""Observability end to end: the live /metrics, a real Prometheus, health probes, logs.

- ``promtool check metrics`` on the live exposition of a service that has learnt records;
- a real Prometheus (Debian's ``prometheus``) on loopback scrapes the service every second
  and evaluates a copy of the chart's alert rules (every ``for:`` set to 0s); PromQL
  asserts throughput, lag back to 0, model version info and the dead-letter alert firing;
- ``/readyz`` is 503 until restore and assignment finish, ``/healthz`` turns 503 when the
  poll loop stalls (the real service in-process, its loop held by a gate in a subclass)
  and stays 200 while the broker is down;
- the log is JSON lines (librdkafka's lines included) and holds no secret.

Every wait is a bounded poll on an observable fact.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_trainer.config import settings_from_mapping
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.embedded import (
    EmbeddedBroker,
    free_port,
    pdeathsig_preexec,
    stop_process_group,
    tail_file,
)
from stream_trainer.laptop.produce import produce
from stream_trainer.operations import app as app_module
from stream_trainer.operations import logs
from stream_trainer.operations.control import send_command
from stream_trainer.operations.service import Service
from tests.conftest import BrokerHandle
from tests.harness import HMAC_KEY, ROOT, ServiceProcess, service_config, wait_for

pytestmark = pytest.mark.integration

RULES = ROOT / "helm" / "stream-trainer" / "files" / "prometheus-rules.yaml"
JOB = "stream-trainer"
DLQ_ALERT = "StreamTrainerDeadLetterRateHigh"
WAIT_S = 90.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _tool(name: str) -> str:
    """Path of a Prometheus binary; fails under CI=true, skips otherwise."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (Debian package 'prometheus'; .ci/run installs it)"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET url; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()
    except OSError as error:
        return 0, str(error)


# --- Prometheus ------------------------------------------------------------------------


def fast_rules(source: Path, target: Path) -> list[str]:
    """Copy the rules file with every ``for:`` set to 0s; returns the alert names."""
    doc = yaml.safe_load(source.read_text())
    names: list[str] = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
                names.append(rule["alert"])
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return names


class PrometheusServer:
    """A Prometheus on a free loopback port scraping ``targets`` every second.

    Runs in its own process group (with PDEATHSIG), so ``stop()`` leaves no orphan.
    """

    def __init__(self, workdir: Path, targets: list[str], rule_file: Path) -> None:
        self.binary = _tool("prometheus")
        self.port = free_port()
        self.workdir = workdir
        self.log_path = workdir / "prometheus.log"
        self.config_path = workdir / "prometheus.yml"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(rule_file)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509
            )
        finally:
            log.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{tail_file(self.log_path)}")
            return _get(f"{self.url}/-/ready", timeout=1.0)[0] == 200

        wait_for(ready, 30.0, "prometheus /-/ready")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=10.0)

    def api(self, path: str, **params: str) -> Any:
        status, body = _get(f"{self.url}{path}?{urllib.parse.urlencode(params)}")
        if status != 200:
            raise AssertionError(f"{path} {params}: HTTP {status}: {body[:500]}")
        payload = json.loads(body)
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant vector result of ``promql`` (list of {metric, value})."""
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, promql: str) -> list[float]:
        return [float(item["value"][1]) for item in self.query(promql)]

    def wait_query(self, promql: str, what: str, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        """Poll until ``promql`` returns a non-empty vector."""
        result: list[dict[str, Any]] = wait_for(
            lambda: self.query(promql), timeout, f"{what} ({promql})", interval=0.5
        )
        return result


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], PrometheusServer]]:
    """``start(targets)`` -> a running PrometheusServer with the fast rules; stopped at teardown."""
    started: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        rules = workdir / "rules.yaml"
        assert DLQ_ALERT in fast_rules(RULES, rules)
        check = subprocess.run(
            [_tool("promtool"), "check", "rules", str(rules)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        server = PrometheusServer(workdir, targets, rules)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    """Service processes to kill at teardown, whatever happened."""
    running: list[ServiceProcess] = []
    yield running
    for service in running:
        service.__exit__()


# --- 1 + 2: promtool check metrics, and PromQL on a real Prometheus ---------------------


def test_metrics_scraped_by_prometheus(
    broker: BrokerHandle,
    tmp_path: Path,
    prometheus_factory: Callable[[list[str]], PrometheusServer],
    services: list[ServiceProcess],
) -> None:
    backlog, burst, burst_bad_ratio = 20_000, 4_000, 0.8
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        overrides={
            "kafka": {"statistics_interval_ms": 1000},
            "registry": {"publish_every_records": 2_000},
        },
    )
    topic = config["topics"]["input"][0]
    service = ServiceProcess(config, tmp_path)
    services.append(service)
    service.start()
    prom = prometheus_factory([f"127.0.0.1:{service.port}"])
    service.wait_ready(WAIT_S)
    prom.wait_query(f'up{{job="{JOB}"}} == 1', "target up")

    dataset = get_dataset("phishing")
    producer = {"bootstrap.servers": broker.bootstrap_servers}
    lag = f'stream_trainer_consumer_lag_records{{job="{JOB}",topic="{topic}"}}'
    # Paused while the backlog is produced, so the lag is there for Prometheus to scrape:
    # an unloaded service learns 20 000 records between two 1 s scrapes.
    model, control_topic = config["model"]["name"], config["topics"]["control"]
    send_command(producer, control_topic, model, "pause")
    service.wait_metric('stream_trainer_state{stream_trainer_state="paused"}', 1, timeout=WAIT_S)
    produce(producer, topic, dataset, backlog, seed=1)
    prom.wait_query(f"{lag} > 0", "the paused backlog seen as lag")
    send_command(producer, control_topic, model, "resume")
    produced_at = time.monotonic()

    # Throughput while the backlog is being learnt.
    rate = prom.wait_query(
        f'rate(stream_trainer_records_learnt_total{{job="{JOB}"}}[20s]) > 0',
        "records learnt rate > 0",
    )
    print(f"\n[{broker.name}] learn rate seen by Prometheus: {float(rate[0]['value'][1]):.0f}/s")

    # Lag back to 0 once everything is learnt.
    learnt = f'stream_trainer_records_learnt_total{{job="{JOB}"}} >= {backlog}'
    prom.wait_query(f"{lag} == 0 and on(instance) ({learnt})", "lag back to 0 after the backlog")
    lag_zero_s = time.monotonic() - produced_at
    peak = prom.values(f"max_over_time({lag}[5m])")
    print(
        f"[{broker.name}] lag back to 0 {lag_zero_s:.1f} s after the service resumed "
        f"(peak lag seen by Prometheus: {peak})"
    )
    assert peak and peak[0] > 0, "Prometheus never saw a non-zero lag: nothing 'returned' to 0"

    # 1. promtool check metrics on the live exposition, histograms and labels populated.
    status, body = service.http("/metrics")
    assert status == 200
    for needle in (
        "stream_trainer_learn_duration_seconds_bucket",
        'stream_trainer_consumer_lag_records{partition="0"',
        "stream_trainer_model_info{",
    ):
        assert needle in body, f"{needle} missing from /metrics"
    check = subprocess.run(
        [_tool("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, f"promtool check metrics:\n{check.stdout}{check.stderr}"

    # Model version info (a version was published every 2000 records).
    info = prom.wait_query(f'stream_trainer_model_info{{job="{JOB}"}}', "model info")
    assert int(info[0]["metric"]["version"]) >= 1, info
    assert info[0]["metric"]["mode"] == "per_record", info
    versions = prom.values(f'stream_trainer_model_version{{job="{JOB}"}}')
    assert versions and versions[0] == float(info[0]["metric"]["version"]), (versions, info)

    # A burst of bad records fires the dead-letter alert (rules copied with for: 0s).
    assert not prom.query(f'ALERTS{{alertname="{DLQ_ALERT}"}}'), "alert before the burst"
    report = produce(producer, topic, dataset, burst, bad_ratio=burst_bad_ratio, seed=2)
    burst_at = time.monotonic()
    prom.wait_query(
        f'ALERTS{{alertname="{DLQ_ALERT}",alertstate="firing"}}', "dead-letter alert firing"
    )
    fired_s = time.monotonic() - burst_at
    alerts = prom.api("/api/v1/alerts")["alerts"]
    firing = [a for a in alerts if a["labels"]["alertname"] == DLQ_ALERT]
    assert firing and firing[0]["state"] == "firing", alerts
    assert firing[0]["labels"]["job"] == JOB
    dead = prom.values(f'sum(stream_trainer_records_dead_lettered_total{{job="{JOB}"}})')
    peak_rate = prom.values(
        f'max_over_time(rate(stream_trainer_records_learnt_total{{job="{JOB}"}}[5s])[2m:1s])'
    )
    print(f"[{broker.name}] peak learn rate (5 s windows): {peak_rate}")
    print(
        f"[{broker.name}] {DLQ_ALERT} firing {fired_s:.1f} s after a burst of {report.invalid} "
        f"bad records; Prometheus counts {dead} dead-lettered"
    )
    assert service.metric("stream_trainer_partitions_halted") == 0
    assert service.stop() == 0


# --- 3a: readiness and a stalled loop, with the real service in-process -----------------


class _Gate:
    """Holds ``restore_state`` and every loop step while closed (a test double's lever)."""

    def __init__(self) -> None:
        self.restore_open = threading.Event()
        self.loop_open = threading.Event()
        self.restoring = threading.Event()
        self.held = threading.Event()
        self.services: list[Service] = []


def _gated_service_class(gate: _Gate) -> type[Service]:
    class GatedService(Service):
        """The real Service; each ``step`` first waits for the gate (never forever)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            gate.services.append(self)

        def step(self) -> None:
            if not gate.loop_open.is_set():
                gate.held.set()
                # Bounded: a broken test must not hang the session.
                if not gate.loop_open.wait(120.0):
                    raise AssertionError("gate never reopened")
                gate.held.clear()
            super().step()

    return GatedService


def test_readyz_and_healthz_follow_the_loop(
    broker: BrokerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    max_age = 2.0
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        overrides={
            "http": {"healthz_max_age_s": max_age},
        },
    )
    produce(
        {"bootstrap.servers": broker.bootstrap_servers},
        config["topics"]["input"][0],
        get_dataset("phishing"),
        500,
        seed=3,
    )
    settings = settings_from_mapping(config, env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY})
    port = settings.http.port

    gate = _Gate()
    real_restore = app_module.restore_state

    def gated_restore(*args: Any, **kwargs: Any) -> Any:
        gate.restoring.set()
        if not gate.restore_open.wait(120.0):
            raise AssertionError("restore gate never opened")
        return real_restore(*args, **kwargs)

    log_stream = io.StringIO()
    monkeypatch.setattr(app_module, "restore_state", gated_restore)
    monkeypatch.setattr(app_module, "Service", _gated_service_class(gate))
    monkeypatch.setattr(
        app_module,
        "configure_logging",
        lambda level, fmt: logs.configure_logging(level, fmt, stream=log_stream),
    )

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["rc"] = app_module.run_service(settings, install_signals=False)
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    def probe(path: str) -> tuple[int, str]:
        return _get(f"http://127.0.0.1:{port}{path}", timeout=2.0)

    def running_ok() -> bool:
        """True while the service thread runs; raises if it ended."""
        if "error" in outcome or "rc" in outcome:
            raise AssertionError(f"service ended early: {outcome}\n{log_stream.getvalue()[-3000:]}")
        return True

    thread = threading.Thread(target=run, name="service-under-test", daemon=True)
    thread.start()
    try:
        # Restoring: the HTTP server answers, not ready, state "restoring".
        assert gate.restoring.wait(30.0), "restore never started"
        status, reason = wait_for(
            lambda: probe("/readyz")[0] and probe("/readyz"), 30.0, "http server up"
        )
        assert (status, reason.strip()) == (503, "starting")
        metrics = probe("/metrics")[1]
        assert 'stream_trainer_state{stream_trainer_state="restoring"} 1.0' in metrics
        assert "stream_trainer_ready 0.0" in metrics

        # Restored, loop entered but held before its first poll: no assignment yet.
        gate.restore_open.set()
        assert gate.held.wait(30.0), "loop never reached its first step"
        running_ok()
        assert probe("/readyz") == (503, "no partitions assigned yet\n")

        # Loop released: assignment, then ready and healthy.
        gate.loop_open.set()
        wait_for(lambda: running_ok() and probe("/readyz")[0] == 200, WAIT_S, "/readyz 200")
        assert probe("/healthz") == (200, "ok\n")
        service = gate.services[0]
        assert service.source.owned, "ready without an assigned partition"

        # Loop held mid-run: /healthz turns 503 after max_age, /metrics still served.
        gate.loop_open.clear()
        assert gate.held.wait(30.0), "loop did not reach the gate"
        held_at = time.monotonic()
        status, reason = wait_for(
            lambda: (r := probe("/healthz"))[0] == 503 and r,
            max_age + 10.0,
            "/healthz 503 while the loop is stalled",
        )
        stalled_s = time.monotonic() - held_at
        assert "poll loop stalled" in reason
        # The last beat came at the start of the step before the held one (<= 1 s earlier).
        assert stalled_s >= max_age - 1.0, f"unhealthy after {stalled_s:.1f} s (max {max_age})"
        assert probe("/metrics")[0] == 200
        print(
            f"\n[{broker.name}] /healthz 503 {stalled_s:.1f} s after the loop stalled "
            f"(max age {max_age} s)"
        )

        # Released again: healthy again.
        gate.loop_open.set()
        wait_for(lambda: probe("/healthz")[0] == 200, 10.0, "/healthz back to 200")

        service.request_stop()
        thread.join(60.0)
        assert not thread.is_alive(), "service did not stop"
        assert outcome == {"rc": 0}, f"{outcome}\n{log_stream.getvalue()[-3000:]}"
    finally:
        gate.restore_open.set()
        gate.loop_open.set()
        for service in gate.services:
            service.request_stop()
        thread.join(60.0)
        # Undo what run_service did process-wide: our root handler and registered secrets.
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "_stream_trainer_handler", False):
                root.removeHandler(handler)
                handler.close()
        logs.clear_secrets()


# --- 3b + 4: broker down keeps /healthz 200; the log is JSON and secret-free ------------


def test_healthy_while_broker_down_and_logs_clean(
    tmp_path: Path, services: list[ServiceProcess]
) -> None:
    max_age = 2.0
    hmac_key = f"hmac-{uuid.uuid4().hex}"
    sasl_password = f"sasl-{uuid.uuid4().hex}"
    try:
        broker = EmbeddedBroker(startup_timeout=30.0).start()
    except Exception as exc:  # same availability rule as the session brokers
        if _in_ci():
            pytest.fail(f"tansu broker unavailable: {exc}", pytrace=False)
        pytest.skip(f"tansu broker unavailable: {exc}")
    try:
        config = service_config(
            tmp_path,
            broker.bootstrap_servers,
            "phishing",
            overrides={
                "http": {"healthz_max_age_s": max_age},
                # A password handed to librdkafka (ignored on PLAINTEXT) and librdkafka's
                # config dump in the log: neither may show the secret.
                "kafka": {
                    "sasl_mechanism": "PLAIN",
                    "sasl_username": "trainer",
                    "extra": {"debug": "conf"},
                },
                "logging": {"level": "DEBUG"},
            },
        )
        service = ServiceProcess(
            config,
            tmp_path,
            env={
                "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": hmac_key,
                "STREAM_TRAINER_KAFKA__SASL_PASSWORD": sasl_password,
            },
        )
        services.append(service)
        produce(
            {"bootstrap.servers": broker.bootstrap_servers},
            config["topics"]["input"][0],
            get_dataset("phishing"),
            1_000,
            seed=4,
        )
        service.start()
        service.wait_metric("stream_trainer_records_learnt_total", 1_000, timeout=WAIT_S)
        service.wait_ready(WAIT_S)
        bodies = [service.http("/metrics")[1]]

        broker.stop()

        def kafka_errors() -> float:
            return sum(
                v
                for k, v in service.metrics().items()
                if k.startswith("stream_trainer_kafka_errors_total")
            )

        wait_for(lambda: kafka_errors() > 0, WAIT_S, "the service to see the broker down")
        beat = service.metric("stream_trainer_poll_heartbeat_timestamp_seconds")
        # "Stays healthy" is a property over time: probe for three times the max age.
        until = time.monotonic() + 3 * max_age
        probes = 0
        while time.monotonic() < until:
            status, reason = service.http("/healthz")
            assert status == 200, f"/healthz {status} {reason!r} with the broker down"
            probes += 1
            time.sleep(0.2)  # polling interval of a bounded observation window
        assert probes >= 10
        assert service.metric("stream_trainer_poll_heartbeat_timestamp_seconds") > beat
        bodies.append(service.http("/metrics")[1])
        print(
            f"\n/healthz 200 on {probes} probes over {3 * max_age:.0f} s with the broker down "
            f"({kafka_errors():.0f} kafka errors counted)"
        )
        service.stop()
    finally:
        broker.stop()

    text = service.log_path.read_text()
    lines = text.splitlines()
    assert lines, "empty log"
    not_json: list[str] = []
    entries: list[dict[str, Any]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            not_json.append(line)
            continue
        if not isinstance(entry, dict) or not {"ts", "level", "event"} <= entry.keys():
            not_json.append(line)
            continue
        entries.append(entry)
    problems: list[str] = []
    if not_json:
        problems.append(
            f"{len(not_json)} of {len(lines)} log lines are not JSON objects with "
            "ts/level/event, e.g.:\n" + "\n".join(not_json[:5])
        )
    # librdkafka's lines: through logs.librdkafka_logger(), facility and client as fields.
    librdkafka = [
        e
        for e in entries
        if e.get("logger") == logs.LIBRDKAFKA_LOGGER and {"facility", "client"} <= e.keys()
    ]
    if not librdkafka:
        loggers = sorted({str(e.get("logger")) for e in entries})
        problems.append(
            f"no JSON line from logger {logs.LIBRDKAFKA_LOGGER!r} with facility/"
            f"client fields (loggers seen: {loggers})"
        )
    for secret in (hmac_key, sasl_password):
        if secret in text:
            problems.append("a secret is in the log")
        if any(secret in body for body in bodies):
            problems.append("a secret is in /metrics")
    assert not problems, "\n".join(problems)
