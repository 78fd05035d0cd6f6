# stream-trainer developer entry points. `make test` is what CI (.ci/run) runs.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
# .venv: runtime + test/lint toolchain + demo extra (the suite runs Tansu and plots).
# .venv-demo: runtime + demo extra only, for `make demo` (no test or lint tools).
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_VENV  := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed
KAFKA  := $(BIN)/python -m stream_trainer.testing.kafka_broker
# Prefix of the builds that are not fatal here (their fixtures retry, then fail under CI=true
# and skip elsewhere). .ci/run passes OPTIONAL= to run them in the background and fail fast.
OPTIONAL ?= -

.PHONY: venv demo-venv kafka-jars registry-jars kube-tools mlflow-venv s3-server test lint demo kafka-start kafka-stop kafka-status

venv: $(STAMP)

# Reinstalled only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test,demo]'
	touch $@

demo-venv: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -e '.[demo]'
	touch $@

# Apache Kafka jars from Maven Central into ~/.cache/stream-trainer (once).
kafka-jars: venv
	$(KAFKA) fetch

# Apicurio Registry 2.4.2 (the tests' Schema Registry) built from Maven Central with the
# Quarkus plugin into ~/.cache/stream-trainer/apicurio-2.4.2 (once; ~1 min cold), outside
# pytest's per-test timeout. The `schema_registry` fixture builds it too if this was skipped.
registry-jars: venv
	$(BIN)/python -m stream_trainer.testing.schema_registry build

# kube-apiserver, kubelet, kube-scheduler, kube-controller-manager, kube-proxy (one go build)
# and helm built from the Go module proxy into ~/.cache/stream-trainer/kube (once; ~12 min
# cold on 2 cores), outside pytest's per-test timeout. A failure here is not fatal:
# tests/kube then fails under CI=true and skips elsewhere, with the reason.
kube-tools: venv
	$(OPTIONAL)$(BIN)/python -m tests.kube.kube_env build

# MLflow (the export tests' tracking server) from PyPI into its own venv,
# ~/.cache/stream-trainer/mlflow-venv (once; ~1-2 min cold), outside pytest's per-test
# timeout and outside the project's venv and image. Not fatal here: the `mlflow_server`
# fixture retries the install, then fails under CI=true and skips elsewhere, with the reason.
mlflow-venv: venv
	$(OPTIONAL)$(BIN)/python -m stream_trainer.testing.mlflow_server install

# SeaweedFS (the object-storage tests' S3 server) built from the Go module proxy into
# ~/.cache/stream-trainer/seaweedfs (once; ~6-10 min cold on 2 cores), outside pytest's
# per-test timeout. Not fatal here: the `s3_server` fixture builds it too if this failed,
# then fails under CI=true and skips elsewhere, with the reason.
s3-server: venv
	$(OPTIONAL)$(BIN)/python -m stream_trainer.testing.seaweedfs build

# Every run's log ends with its 30 slowest tests (setup, call and teardown timed apart),
# so CI time can be tracked from the log alone. Extra arguments: `make test PYTEST_ARGS=...`.
PYTEST_DURATIONS ?= --durations=30 --durations-min=1.0
# pytest-xdist workers: most tests wait on brokers, servers and timeouts, so 2 on 2 cores
# nearly halve the wall time. `loadgroup` keeps the tests of a per-machine server (own
# dockerd, kubelet node) on one worker (tests/parallel.py). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL ?= -n $(PYTEST_WORKERS) $(if $(filter 0,$(PYTEST_WORKERS)),,--dist loadgroup)
test: venv kafka-jars registry-jars kube-tools mlflow-venv s3-server
	$(BIN)/pytest $(PYTEST_PARALLEL) $(PYTEST_DURATIONS) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy stream_trainer tests

demo: demo-venv
	$(DEMO_VENV)/bin/stream-trainer demo

# A detached single-node Kafka for manual use, on 127.0.0.1:$(KAFKA_PORT) so configs can
# name it (configs/local.yaml does); `make kafka-start KAFKA_PORT=19092` for another port.
KAFKA_PORT ?= 9092
kafka-start: venv kafka-jars
	$(KAFKA) start --port $(KAFKA_PORT)

kafka-stop: venv
	$(KAFKA) stop

kafka-status: venv
	$(KAFKA) status
