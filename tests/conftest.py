"""Session-wide real brokers for the test suite.

Fixtures
--------
``kafka_broker``  (session) Apache Kafka 4.x KRaft single node (:class:`BrokerHandle`).
``tansu_broker``  (session) embedded Tansu, memory only (:class:`BrokerHandle`).
``broker``        (function, params ``kafka``/``tansu``) one of the two; test ids read
                  ``test_x[kafka]`` and ``test_x[tansu]``. ``@KAFKA_ONLY`` narrows a
                  ``broker`` test to ``kafka`` (see its comment for when).
``make_topic``    factory ``make_topic(partitions=1, *, prefix="t", config=None) -> str``
                  creating a uniquely named topic on ``broker`` and waiting until visible.
``unique_topic``  a fresh 1-partition topic name on ``broker``.
``schema_registry`` (session) Apicurio Registry 2.4.2, in memory, Confluent API at
                  ``schema_registry.url`` (:class:`SchemaRegistry`); same availability rule.
``mlflow_server`` (session) MLflow tracking server (SQLite, artifact proxy) at
                  ``mlflow_server.url`` (:class:`MlflowServer`); same availability rule.
``s3_server``     (session) SeaweedFS ``weed server -s3`` (:class:`SeaweedFS`): S3 API at
                  ``s3_server.endpoint_url``, identities ``admin`` (all) and ``reader``
                  (read + list); same availability rule. ``s3_url``: a fresh
                  ``s3://<bucket>/<prefix>`` on it (one bucket, a prefix per test).
``images``        (session, tests/container/fixtures.py) private dockerd + project image.
``postgres``      (session) private PostgreSQL (Debian package, tests/postgres_env.py); same
                  availability rule.

Availability rule: a broker that cannot start makes its tests FAIL when ``CI=true``
(with the reason and the tail of the broker log) and SKIP otherwise. A broker is started
at most once per session, on first use, and stopped at session end.
``STREAM_TRAINER_BROKERS=tansu`` (comma list) limits the brokers tried locally.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pytest

from stream_trainer.laptop.embedded import EmbeddedBroker, create_topics
from stream_trainer.testing.kafka_broker import KafkaBroker
from stream_trainer.testing.mlflow_server import MlflowServer
from stream_trainer.testing.schema_registry import SchemaRegistry
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.postgres_env import Postgres, PostgresError

_Server = TypeVar("_Server")

BROKER_NAMES = ("kafka", "tansu")

# ``images`` (private dockerd + project image), shared by tests/container and tests/kube;
# tests.parallel: which tests share one pytest-xdist worker (the per-machine servers).
pytest_plugins = ("tests.container.fixtures", "tests.parallel")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _wanted() -> set[str]:
    raw = os.environ.get("STREAM_TRAINER_BROKERS", "")
    return {n.strip() for n in raw.split(",") if n.strip()} or set(BROKER_NAMES)


@dataclass
class BrokerHandle:
    """What tests get: ``name``, ``bootstrap_servers``, ``restart()``, ``kill()``.

    ``restart()`` (Kafka only) stops the broker gracefully and starts it again on the
    same address with its data kept; ``kill()`` + ``start()`` is the crash variant.
    On Tansu (memory only) these call ``pytest.skip``.
    """

    name: str
    impl: Any = field(repr=False)

    @property
    def bootstrap_servers(self) -> str:
        value: str = self.impl.bootstrap_servers
        return value

    @property
    def pid(self) -> int | None:
        value: int | None = self.impl.pid
        return value

    @property
    def supports_restart(self) -> bool:
        return isinstance(self.impl, KafkaBroker)

    def _need_restart(self) -> KafkaBroker:
        if not isinstance(self.impl, KafkaBroker):
            pytest.skip(f"{self.name} is memory-only: a restart would lose all data")
        return self.impl

    def restart(self) -> None:
        self._need_restart().restart()

    def stop(self) -> None:
        self._need_restart().stop()

    def kill(self) -> None:
        self._need_restart().kill()

    def start(self) -> None:
        self._need_restart().start()

    def log_tail(self, lines: int = 40) -> str:
        value: str = self.impl.log_tail(lines)
        return value


@dataclass
class _Pool:
    started: dict[str, BrokerHandle] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    ran: dict[str, str] = field(default_factory=dict)
    uses: dict[str, int] = field(default_factory=dict)

    def get(self, name: str) -> BrokerHandle:
        if name not in self.started and name not in self.errors:
            self._start(name)
        if name in self.errors:
            reason = f"{name} broker unavailable: {self.errors[name]}"
            if _in_ci() and name in _wanted():
                pytest.fail(reason, pytrace=False)
            pytest.skip(reason)
        return self.started[name]

    def _start(self, name: str) -> None:
        if name not in _wanted():
            self.errors[name] = "not in STREAM_TRAINER_BROKERS"
            return
        began = time.monotonic()
        impl: KafkaBroker | EmbeddedBroker = (
            KafkaBroker() if name == "kafka" else EmbeddedBroker(startup_timeout=30.0)
        )
        try:
            impl.start()
        except Exception as exc:
            if isinstance(impl, KafkaBroker):
                impl.close()
            else:
                impl.stop()
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            return
        self.ran[name] = f"{impl.bootstrap_servers}, started in {time.monotonic() - began:.1f} s"
        self.started[name] = BrokerHandle(name, impl)

    def close_all(self) -> None:
        while self.started:
            _, handle = self.started.popitem()
            impl = handle.impl
            if isinstance(impl, KafkaBroker):
                impl.close()
            else:
                impl.stop()


_POOL = _Pool()
_REPORT: list[str] = []


@pytest.fixture(scope="session")
def _broker_pool() -> Iterator[_Pool]:
    try:
        yield _POOL
    finally:
        _POOL.close_all()


@pytest.fixture(scope="session")
def kafka_broker(_broker_pool: _Pool) -> BrokerHandle:
    """Apache Kafka 4.x KRaft single node for the whole session."""
    return _broker_pool.get("kafka")


@pytest.fixture(scope="session")
def tansu_broker(_broker_pool: _Pool) -> BrokerHandle:
    """Embedded Tansu (memory only) for the whole session."""
    return _broker_pool.get("tansu")


@pytest.fixture(params=BROKER_NAMES)
def broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """Each real broker in turn (ids ``kafka`` / ``tansu``)."""
    handle: BrokerHandle = request.getfixturevalue(f"{request.param}_broker")
    return handle


# For a ``broker`` test whose assertions are about the service, not the broker (learning,
# drift, versions, the registry): each broker costs it tens of seconds, and what both
# brokers must do (produce, consume, commit, groups, the callbacks) is proven by the tests
# that still run on both. Apache Kafka because it is the reference for group and
# transaction semantics. The test ids stay ``test_x[kafka]``.
KAFKA_ONLY = pytest.mark.parametrize("broker", ["kafka"], indirect=True)


class _ServerSlot(Generic[_Server]):
    """One server shared by the whole session, started by its fixture on first use.

    A start that fails is remembered: every test asking for the server then FAILS under
    CI=true and skips elsewhere, with the reason. ``label`` names it in the run's summary.
    """

    def __init__(self, label: str, what: str, close: Callable[[_Server], None]) -> None:
        self.label, self.what, self._close = label, what, close
        self.server: _Server | None = None
        self.error: str | None = None
        self.ran: str | None = None

    def serve(
        self,
        start: Callable[[], _Server],
        describe: Callable[[_Server], str],
        errors: tuple[type[BaseException], ...] = (Exception,),
    ) -> Iterator[_Server]:
        """The fixture's body: start (once), yield the server, close it at the end."""
        if self.server is None and self.error is None:
            try:
                self.server = start()
            except errors as exc:
                self.error = f"{type(exc).__name__}: {exc}"  # its str may hold a log tail
            else:
                self.ran = describe(self.server)
        if self.server is None:
            reason = f"{self.what} unavailable: {self.error}"
            if _in_ci():
                pytest.fail(reason, pytrace=False)
            pytest.skip(reason)
        try:
            yield self.server
        finally:
            self.close()

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            self._close(server)

    def summary(self) -> str | None:
        """Its line in the run's summary, or None when no test asked for it."""
        if not (self.ran or self.error):
            return None
        verdict = "FAILED" if _in_ci() else "skipped"
        line = f"ran ({self.ran})" if self.ran else f"{verdict} - {self.error}"
        return f"{self.label}: {line.splitlines()[0]}"


def _started(server: _Server, start: Callable[[], object], close: Callable[[], None]) -> _Server:
    """``server`` once ``start()`` returned; closed (and the error raised) if it failed."""
    try:
        start()
    except BaseException:
        close()
        raise
    return server


def _new_schema_registry() -> SchemaRegistry:
    registry = SchemaRegistry()
    return _started(registry, registry.start, registry.close)


def _new_postgres() -> Postgres:
    server = Postgres()
    return _started(server, server.start, server.stop)


def _new_mlflow() -> MlflowServer:
    server = MlflowServer()
    return _started(server, server.start, server.close)


def _new_seaweedfs() -> SeaweedFS:
    server = SeaweedFS()
    return _started(server, server.start, server.close)


_REGISTRY = _ServerSlot[SchemaRegistry](
    "apicurio", "schema registry (Apicurio)", SchemaRegistry.close
)
_POSTGRES = _ServerSlot[Postgres]("postgresql", "PostgreSQL", Postgres.stop)
_MLFLOW = _ServerSlot[MlflowServer]("mlflow", "MLflow tracking server", MlflowServer.close)
_S3 = _ServerSlot[SeaweedFS]("seaweedfs", "S3 server (SeaweedFS)", SeaweedFS.close)
_SERVERS: tuple[_ServerSlot[Any], ...] = (_REGISTRY, _S3, _POSTGRES, _MLFLOW)


@pytest.fixture(scope="session")
def schema_registry() -> Iterator[SchemaRegistry]:
    """Apicurio Registry (in memory) for the whole session: built on first use (~1 min
    cold, cached), started on a free loopback port. Fails under CI=true, skips elsewhere,
    when it cannot run (no Java/Maven, build or start-up failed)."""

    def describe(registry: SchemaRegistry) -> str:
        rss = (registry.rss_bytes() or 0) / 2**20
        return f"{registry.url}, started in {registry.start_seconds:.1f} s, RSS {rss:.0f} MiB"

    yield from _REGISTRY.serve(_new_schema_registry, describe)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL server (Debian's package) on a free loopback port, password
    authentication, for the whole session (``postgres.url``, ``postgres.new_database()``).
    Fails under CI=true, skips elsewhere, when it cannot start."""
    yield from _POSTGRES.serve(
        _new_postgres,
        lambda server: f"port {server.port}, started in {server.start_seconds:.1f} s",
        errors=(PostgresError, OSError),
    )


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    """An MLflow tracking server for the whole session (MLflow installed on first use into
    a cached venv, ~1-2 min cold). Fails under CI=true, skips elsewhere, when it cannot run."""
    yield from _MLFLOW.serve(_new_mlflow, lambda server: f"{server.url}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedFS]:
    """SeaweedFS (S3 API, signed requests) for the whole session: built on first use
    (~10 min cold on 2 cores, cached), started on free loopback ports. Fails under CI=true,
    skips elsewhere, when it cannot run (no Go, build or start-up failed)."""
    yield from _S3.serve(
        _new_seaweedfs,
        lambda server: f"{server.endpoint_url}, started in {server.start_seconds:.1f} s",
    )


@pytest.fixture
def s3_url(s3_server: SeaweedFS) -> str:
    """A fresh, empty location ``s3://<bucket>/<prefix>`` on ``s3_server``."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"


def new_topic(
    broker: BrokerHandle,
    partitions: int = 1,
    *,
    prefix: str = "t",
    config: Mapping[str, str] | None = None,
) -> str:
    """Create a uniquely named topic on ``broker``; returns its name once visible."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    create_topics(broker.bootstrap_servers, {name: partitions}, timeout=30.0, config=config)
    return name


@pytest.fixture
def make_topic(broker: BrokerHandle) -> Callable[..., str]:
    """Factory: ``make_topic(partitions=1, *, prefix="t", config=None) -> name``."""

    def _make(
        partitions: int = 1, *, prefix: str = "t", config: Mapping[str, str] | None = None
    ) -> str:
        return new_topic(broker, partitions, prefix=prefix, config=config)

    return _make


@pytest.fixture
def unique_topic(make_topic: Callable[..., str]) -> str:
    """A fresh 1-partition topic on ``broker``."""
    return make_topic(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Count the tests that actually ran against each broker (setup succeeded).

    Counted after the call: tests that pick their broker at run time
    (``request.getfixturevalue("kafka_broker")``) are known only then.
    """
    try:
        yield
    finally:
        names: set[str] = set()
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("broker") in BROKER_NAMES:
            names.add(callspec.params["broker"])
        requested = set(getattr(item, "fixturenames", ()))
        # Fixtures resolved during the call (getfixturevalue) live on the item's request.
        requested.update(getattr(getattr(item, "_request", None), "_fixture_defs", {}))
        names.update(n for n in BROKER_NAMES if f"{n}_broker" in requested and n in _POOL.ran)
        for name in names:
            _POOL.uses[name] = _POOL.uses.get(name, 0) + 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Backstop: no broker outlives the session, whatever happened to fixtures.

    Under pytest-xdist this runs in each worker, whose servers are its own: the worker's
    summary lines travel to the controller in ``workeroutput`` (see pytest_testnodedown).
    """
    for name in BROKER_NAMES:
        if name in _POOL.ran:
            _REPORT.append(
                f"{name}: ran ({_POOL.ran[name]}; used by {_POOL.uses.get(name, 0)} tests)"
            )
        elif name in _POOL.errors:
            verdict = "FAILED" if _in_ci() and name in _wanted() else "skipped"
            first_line = _POOL.errors[name].splitlines()[0]
            _REPORT.append(f"{name}: {verdict} - {first_line}")
        else:
            _REPORT.append(f"{name}: not needed")
    _POOL.close_all()
    for slot in _SERVERS:
        slot.close()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["stream_trainer_servers"] = _summary_lines()


def _summary_lines() -> list[str]:
    """This process's brokers and servers: how each ran, or why not."""
    lines = list(_REPORT) if _POOL.ran or _POOL.errors else []
    return lines + [line for slot in _SERVERS if (line := slot.summary()) is not None]


# Summary lines of the pytest-xdist workers, by worker id (the controller starts no server).
_WORKER_LINES: dict[str, list[str]] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object | None) -> None:
    """pytest-xdist controller: keep a finished worker's summary lines."""
    lines = getattr(node, "workeroutput", {}).get("stream_trainer_servers")
    if lines:
        _WORKER_LINES[str(node.gateway.id)] = list(lines)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """Say which brokers (and schema registry) the integration tests ran against; under
    pytest-xdist, each worker's own, prefixed with its id (``gw0``)."""
    lines = _summary_lines()
    for worker in sorted(_WORKER_LINES):
        lines += [f"[{worker}] {line}" for line in _WORKER_LINES[worker]]
    if not lines:
        return
    terminalreporter.section("brokers")
    for line in lines:
        terminalreporter.write_line(line)
