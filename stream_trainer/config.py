"""The service's one typed, frozen configuration tree.

Loaded from a YAML file (``--config`` or ``STREAM_TRAINER_CONFIG``) with environment
overrides (``STREAM_TRAINER_`` prefix, ``__`` between nested keys, e.g.
``STREAM_TRAINER_KAFKA__BOOTSTRAP_SERVERS``). Every nested model forbids unknown keys,
so a typo anywhere is an error naming its path. Secrets are ``SecretStr`` (masked when
dumped) and may come from files (``*_file``) mounted from a Kubernetes Secret.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.logs import librdkafka_logger

CONFIG_ENV_VAR = "STREAM_TRAINER_CONFIG"
ENV_PREFIX = "STREAM_TRAINER_"

TrainingMode = Literal["per_record", "mini_batch", "full_batch"]
Task = Literal["binary_classification", "multiclass_classification", "regression"]
Label = int | str | bool

# librdkafka keys that carry secrets: they must come from SecretStr fields, never from
# the plain pass-through map (which is rendered into ConfigMaps and printed).
_SECRET_KAFKA_KEYS = frozenset(
    {"sasl.password", "ssl.key.password", "ssl.key.pem", "sasl.oauthbearer.client.secret"}
)


# The environment a load reads: os.environ unless a caller (a test, the Helm chart check)
# passes its own mapping.
_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("environment", default=None)


class _EnvValueError(StreamTrainerError, ValueError):
    """An environment override that cannot be decoded; the message is for the user."""


def _list_item_type(field: FieldInfo | None) -> Any:
    """The item type when ``field`` is a list (optionally ``| None``), else None."""
    annotation = field.annotation if field is not None else None
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for option in typing.get_args(annotation) if union else (annotation,):
        if typing.get_origin(option) is list:
            return (typing.get_args(option) or (Any,))[0]
    return None


def _split_list(value: str, item_type: Any) -> list[Any]:
    """``a, b`` as a list; items of a non-``str`` list are read as JSON scalars where
    they parse (``0,1`` gives integer labels), else kept as strings."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if item_type is str:
        return items
    out: list[Any] = []
    for item in items:
        try:
            decoded = json.loads(item)
        except ValueError:
            decoded = item
        out.append(decoded if isinstance(decoded, str | int | float | bool) else item)
    return out


class _MappingEnvSource(EnvSettingsSource):
    """Reads overrides from a given mapping (the process environment by default).

    A list field also accepts a comma-separated value (``STREAM_TRAINER_TOPICS__INPUT=a,b``)
    besides a JSON list; a value that is neither fails naming its variable.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key.lower(): value for key, value in self._environ.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        item_type = _list_item_type(field)
        text = value.strip() if isinstance(value, str) else value
        if item_type is not None and isinstance(text, str) and not text.startswith("["):
            return _split_list(text, item_type)
        try:
            return super().decode_complex_value(field_name, field, value)  # type: ignore[arg-type]
        except ValueError:
            forms = (
                'a comma-separated list (a,b) or a JSON list (["a","b"])'
                if item_type is not None
                else 'JSON (e.g. {"key": "value"})'
            )
            raise _EnvValueError(
                f"{self._variable(field_name, value)}: cannot read {value!r}; give {forms}"
            ) from None

    def _variable(self, field_name: str, value: Any) -> str:
        """The environment variable that holds ``value`` for ``field_name``."""
        suffix = field_name.upper()
        for key, text in self._environ.items():
            name = key.upper()
            if name.startswith(ENV_PREFIX) and name.endswith(suffix) and text == value:
                return name
        return f"{ENV_PREFIX}...{suffix}"


class ConfigError(StreamTrainerError):
    """The configuration is invalid; the message names every offending field."""


class StrictModel(BaseModel):
    """Base of every config section: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# An object-store location (``s3://``, ``gs://`` or ``az://`` + ``bucket/prefix``); anything
# else is a local path. Tried first (left to right), so a URL never becomes
# Path("s3:/bucket"), which drops a slash.
STORE_SCHEMES = ("s3://", "gs://", "az://")


def known_store_scheme(value: Any) -> Any:
    """``value`` unchanged, unless it is a URL of a store we do not speak (ValueError):
    Path("hdfs://b") would quietly become the relative folder "hdfs:/b"."""
    if isinstance(value, str) and "://" in value and not value.startswith(STORE_SCHEMES):
        raise ValueError(
            f"unsupported URL {value!r}: use a folder, s3://bucket/prefix, "
            "gs://bucket/prefix or az://container/prefix"
        )
    return value


StoreUrl = Annotated[str, StringConstraints(pattern=r"^(s3|gs|az)://[^/?#@:]+(/[^?#]*)?$")]


def _read_secret(value: SecretStr | None, file: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        return file.read_text(encoding="utf-8").strip()
    return None


class KafkaSettings(StrictModel):
    """Connection and consumer settings; ``extra`` passes through to librdkafka."""

    bootstrap_servers: str = Field(
        min_length=1,
        description=(
            "the brokers to connect to, host:port[,host:port...] (librdkafka "
            "bootstrap.servers); one reachable broker is enough, it names the others"
        ),
    )
    group_id: str = Field(
        min_length=1,
        description=(
            "the consumer group of this model: offsets are committed there (for lag "
            "monitoring) and <group_id>.lease elects the active member; one group per model, "
            "a new group_id starts a new model"
        ),
    )
    client_id: str = Field(
        default="stream-trainer",
        description=(
            "librdkafka client.id of the consumer and producers, shown in broker logs and "
            "quotas; change it to tell deployments apart on a shared cluster"
        ),
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description=(
            "librdkafka security.protocol: SSL for TLS, SASL_* for SASL authentication "
            "(then sasl_mechanism, sasl_username and a password are required)"
        ),
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        description="librdkafka sasl.mechanism; required with SASL_*, unused otherwise",
    )
    sasl_username: str | None = Field(
        default=None, description="SASL user name (sasl.username); required with SASL_*"
    )
    sasl_password: SecretStr | None = Field(
        default=None,
        description=(
            "SASL password; prefer env (STREAM_TRAINER_KAFKA__SASL_PASSWORD) or "
            "sasl_password_file to the config file; masked whenever the config is printed"
        ),
    )
    sasl_password_file: Path | None = Field(
        default=None,
        description=(
            "file holding the SASL password (e.g. a mounted Secret), read when a client "
            "is created, whitespace stripped; used when sasl_password is not set"
        ),
    )
    ssl_ca_location: Path | None = Field(
        default=None,
        description=(
            "PEM file of the CA certificate(s) that verify the brokers (ssl.ca.location); "
            "null: librdkafka's default"
        ),
    )
    ssl_certificate_location: Path | None = Field(
        default=None,
        description=(
            "PEM file of the client certificate for mutual TLS "
            "(ssl.certificate.location); null: no client certificate"
        ),
    )
    ssl_key_location: Path | None = Field(
        default=None,
        description="PEM file of the client certificate's private key (ssl.key.location)",
    )
    session_timeout_ms: int = Field(
        default=10_000,
        ge=1_000,
        le=300_000,
        description=(
            "milliseconds (session.timeout.ms, 1000-300000): a member silent this long is "
            "dead, its partitions and the lease move on; a static member that stops is "
            "replaced only after it. Lower: faster take-over; higher: fewer false alarms"
        ),
    )
    group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "static group membership (group.instance.id): a restarted member takes its "
            "partitions back at once instead of after session_timeout_ms; default: the "
            "host name (the pod name on Kubernetes) plus a digest of checkpoint.dir"
        ),
    )
    heartbeat_interval_ms: int = Field(
        default=2_000,
        ge=100,
        description=(
            "milliseconds between group heartbeats (heartbeat.interval.ms); keep it at a "
            "third of session_timeout_ms or less"
        ),
    )
    max_poll_interval_ms: int = Field(
        default=300_000,
        ge=10_000,
        description=(
            "milliseconds (max.poll.interval.ms) the loop may go without polling before "
            "the broker removes the member; the loop polls between units, so raise it only "
            "if one unit takes minutes to learn"
        ),
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest",
        description=(
            "where a partition with neither a checkpoint nor a committed offset starts: "
            "earliest learns the topic's history, latest only records produced from now"
        ),
    )
    consume_batch_size: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description=(
            "most messages one poll takes from librdkafka (1-100000); in mini_batch at most "
            "what the unit still lacks. Larger: less overhead per record"
        ),
    )
    consume_timeout_s: float = Field(
        default=0.2,
        gt=0,
        le=10,
        description=(
            "seconds one poll waits when no message is queued (up to 10); bounds how late "
            "an idle loop sees a signal, a control command or a due checkpoint"
        ),
    )
    read_ahead_records: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description=(
            "partition and key scope: most records consumed and waiting to be learnt. The "
            "learner runs on its own thread and keeps learning the partitions that stay "
            "while a rebalance holds the consumer; this bounds that buffer's memory "
            "(records times their size): up to twice it while a partition has nothing "
            "waiting, plus one poll"
        ),
    )
    decode_worker: bool = Field(
        default=True,
        description=(
            "decode the next unit in a child process while this one is learnt (two cores "
            "busy, not one); false: decode on the poll thread, e.g. on a one-core pod"
        ),
    )
    # librdkafka's default 1000 ms stalls a consumer faster than ~100k records/s once its
    # prefetch queue fills; 10 ms measured 2.2x on ingestion here.
    fetch_queue_backoff_ms: int = Field(
        default=10,
        ge=0,
        description=(
            "milliseconds librdkafka waits before fetching again when its prefetch queue "
            "is full (fetch.queue.backoff.ms); its own default, 1000, stalls fast consumers"
        ),
    )
    # librdkafka's default prefetch queue (64 MB) filled up over a 1M-record run and showed
    # as +21 % RSS; 16 MB still holds ~0.3 s of records at 100k records/s of 500 bytes.
    prefetch_max_kbytes: int = Field(
        default=16_384,
        ge=1_024,
        description=(
            "kilobytes of messages librdkafka prefetches at most "
            "(queued.max.messages.kbytes); more costs memory, less may starve a fast loop"
        ),
    )
    statistics_interval_ms: int = Field(
        default=5_000,
        ge=0,
        description=(
            "milliseconds between librdkafka statistics (statistics.interval.ms), which "
            "update the consumer lag gauge; 0 turns them and that gauge off"
        ),
    )
    extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "other librdkafka properties (e.g. message.max.bytes) for every client; in the "
            "consumer they override the service's own settings. Secret keys are refused "
            "(they would be printed): use the fields above"
        ),
    )

    @field_validator("extra")
    @classmethod
    def _no_secrets_in_extra(
        cls, value: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        leaked = sorted(set(value) & _SECRET_KAFKA_KEYS)
        if leaked:
            raise ValueError(
                f"{leaked} must not be set in kafka.extra (it is rendered in plain text); "
                "use kafka.sasl_password / *_file or the environment"
            )
        return value

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None or self.sasl_username is None:
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs sasl_mechanism and "
                    "sasl_username"
                )
            if self.sasl_password is None and self.sasl_password_file is None:
                raise ValueError(
                    "SASL needs a password: STREAM_TRAINER_KAFKA__SASL_PASSWORD or "
                    "kafka.sasl_password_file"
                )
        return self

    def client_config(self) -> dict[str, Any]:
        """Settings shared by every librdkafka client (consumer, producer, admin)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
            # librdkafka's own log lines go through the service's JSON formatter.
            "logger": librdkafka_logger(),
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = _read_secret(self.sasl_password, self.sasl_password_file)
        for key, path in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if path is not None:
                conf[key] = str(path)
        conf.update(self.extra)
        return conf

    def consumer_config(self) -> dict[str, Any]:
        """Consumer settings: offsets are stored and committed by the service only."""
        conf = self.client_config()
        conf.update(
            {
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": self.auto_offset_reset,
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": self.heartbeat_interval_ms,
                "max.poll.interval.ms": self.max_poll_interval_ms,
                "fetch.queue.backoff.ms": self.fetch_queue_backoff_ms,
                "queued.max.messages.kbytes": self.prefetch_max_kbytes,
                "statistics.interval.ms": self.statistics_interval_ms,
                "enable.partition.eof": False,
            }
        )
        for key, value in self.extra.items():
            conf[key] = value
        return conf

    def producer_config(self) -> dict[str, Any]:
        """Producer settings: idempotent, acks=all, so repeats are never duplicated."""
        conf = self.client_config()
        conf.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
        return conf


class SchemaRegistrySettings(StrictModel):
    """Schema Registry (Confluent REST API) that decodes avro / json_schema record values."""

    url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description=(
            "base URL of the registry's Confluent-compatible API, e.g. "
            "http://registry:8081 or Apicurio's http://apicurio:8080/apis/ccompat/v7; "
            "required when record.format is avro or json_schema"
        ),
    )
    basic_auth_user: str | None = Field(
        default=None,
        min_length=1,
        description="HTTP basic auth user name; null: no authentication",
    )
    basic_auth_password: SecretStr | None = Field(
        default=None,
        description=(
            "HTTP basic auth password; prefer env "
            "(STREAM_TRAINER_SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD) or basic_auth_password_file "
            "to the config file; masked whenever the config is printed"
        ),
    )
    basic_auth_password_file: Path | None = Field(
        default=None,
        description=(
            "file holding the basic auth password (e.g. a mounted Secret), read when the "
            "client is created, whitespace stripped; used when basic_auth_password is not set"
        ),
    )
    ssl_ca_location: Path | None = Field(
        default=None,
        description=(
            "PEM file (or folder) of the CA certificate(s) that verify an https registry; "
            "null: the certifi bundle"
        ),
    )
    ssl_certificate_location: Path | None = Field(
        default=None,
        description="PEM file of a client certificate for mutual TLS; null: none",
    )
    ssl_key_location: Path | None = Field(
        default=None,
        description="PEM file of the client certificate's private key (unencrypted)",
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "seconds one registry request may take before it counts as a failure and is retried"
        ),
    )
    retry_backoff_initial_s: float = Field(
        default=0.5,
        gt=0,
        description=(
            "seconds before the first retry while the registry is unreachable, slow or "
            "answers 5xx/429; doubled after each failure up to retry_backoff_max_s. Records "
            "wait meanwhile (never dead-lettered for it)"
        ),
    )
    retry_backoff_max_s: float = Field(
        default=30.0,
        gt=0,
        description="longest wait between two retries of the registry, seconds",
    )

    @model_validator(mode="after")
    def _auth_complete(self) -> SchemaRegistrySettings:
        has_password = (
            self.basic_auth_password is not None or self.basic_auth_password_file is not None
        )
        # A password alone is unused until a registry is configured (as a SASL password is
        # without SASL): environments may set it everywhere; a user alone is a mistake.
        has_user = self.basic_auth_user is not None
        if (has_user and not has_password) or (has_password and not has_user and self.url):
            raise ValueError(
                "basic auth needs both basic_auth_user and a password "
                "(STREAM_TRAINER_SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD or basic_auth_password_file)"
            )
        if self.url is not None and "@" in self.url.split("://", 1)[1].split("/", 1)[0]:
            # A password in the URL would be printed with the config and in every error.
            raise ValueError(
                "schema_registry.url must not carry credentials: use basic_auth_user and "
                "basic_auth_password / basic_auth_password_file"
            )
        if self.retry_backoff_max_s < self.retry_backoff_initial_s:
            raise ValueError("retry_backoff_max_s must be >= retry_backoff_initial_s")
        if self.ssl_key_location is not None and self.ssl_certificate_location is None:
            raise ValueError("ssl_key_location needs ssl_certificate_location")
        return self

    def client_config(self) -> dict[str, Any]:
        """confluent-kafka ``SchemaRegistryClient`` settings (holds the password: never log
        it). The client's own retries are off: the caller retries with its own backoff."""
        if self.url is None:
            raise ConfigError("schema_registry.url is not set")
        conf: dict[str, Any] = {
            "url": self.url,
            "timeout": self.request_timeout_s,
            "max.retries": 0,
        }
        if self.basic_auth_user is not None:
            password = _read_secret(self.basic_auth_password, self.basic_auth_password_file)
            conf["basic.auth.user.info"] = f"{self.basic_auth_user}:{password or ''}"
        for key, path in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if path is not None:
                conf[key] = str(path)
        return conf


class TopicsSettings(StrictModel):
    """Topics the service reads and writes."""

    input: Annotated[list[str], Field(min_length=1)] = Field(
        description=(
            "the topics to learn from, all into one model; from the environment a,b or a JSON list"
        )
    )
    dead_letter: str = Field(
        min_length=1,
        description=(
            "where records that fail decoding, validation or learning go, with provenance "
            "headers (topics create: 1 partition, 14 days' retention)"
        ),
    )
    versions: str = Field(
        min_length=1,
        description=(
            "where each published version and champion change is announced, keyed by "
            "model name; keep it compacted (topics create does)"
        ),
    )
    control: str | None = Field(
        default=None,
        description=(
            "topic of manual commands (stream-trainer control retrain / publish / pause / "
            "resume) and of their acks (docs/control.md); null: no control channel. Waited "
            "for at start while missing"
        ),
    )
    lease: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "one-partition topic whose owner in the group <kafka.group_id>.lease is the one "
            "active member (the others stand by); created if missing; default "
            "<kafka.group_id>.lease"
        ),
    )


class ControlSettings(StrictModel):
    """How the service treats commands on topics.control (see docs/control.md)."""

    max_age_s: float = Field(
        default=3600.0,
        gt=0,
        description=(
            "a command older than this when the service reads it (it was down) is refused, "
            "not acted on; age = the service's clock - the sender's"
        ),
    )


FeatureType = Literal["number", "category", "boolean"]


class FeatureConfig(StrictModel):
    """One typed feature of the record contract (a plain name means number, required)."""

    name: str = Field(min_length=1, description="the feature's field name in the record")
    type: FeatureType = Field(
        default="number",
        description=(
            "number (finite int or float), category (a string or an integer code), or "
            "boolean (true / false; a number is not a boolean)"
        ),
    )
    missing: Literal["reject", "allow"] = Field(
        default="reject",
        description=(
            "an absent or null value: reject dead-letters the record; allow lets the learner "
            "see it as missing (River: the key is left out; scikit-learn: an indicator column "
            "plus a fill, or native missing-value support)"
        ),
    )
    categories: list[Annotated[str, Field(min_length=1)] | int] | None = Field(
        default=None,
        description=(
            "category only: the known categories (type-strict: 1 is not '1'); null: an open "
            "list, each value hashed to a stable 53-bit code"
        ),
    )
    unknown_category: Literal["other", "reject"] = Field(
        default="other",
        description=(
            "category with a categories list: a value not in it goes to one shared 'other' "
            "bucket, or is dead-lettered (reject)"
        ),
    )

    @model_validator(mode="after")
    def _categories_for_category(self) -> FeatureConfig:
        if self.categories is not None:
            if self.type != "category":
                raise ValueError(f"feature {self.name!r}: categories need type: category")
            if not self.categories:
                raise ValueError(f"feature {self.name!r}: categories is empty")
            keys = [(type(c), c) for c in self.categories]
            if len(set(keys)) != len(keys):
                raise ValueError(f"feature {self.name!r}: categories has duplicates")
        return self


class RecordSettings(StrictModel):
    """The record contract: where features, label and metadata live in a JSON value."""

    format: Literal["json", "avro", "json_schema"] = Field(
        default="json",
        description=(
            "wire format of a record value: json (a plain JSON object), or avro / "
            "json_schema in the Confluent wire format (magic byte 0, 4-byte schema id), "
            "decoded with schemas from schema_registry.url"
        ),
    )
    features: Annotated[list[str | FeatureConfig], Field(min_length=1)] = Field(
        description=(
            "the features, in the order the learners see them: a name (a required number) "
            "or {name, type, missing, categories, unknown_category} (see docs/records.md)"
        )
    )
    features_field: str | None = Field(
        default="x", description="object holding the features; null = flat top-level fields"
    )
    label_field: str = Field(
        default="y", description="top-level field holding the label (class or target value)"
    )
    id_field: str | None = Field(
        default=None,
        description=(
            "optional field holding a record id: a known field (never an unknown feature); "
            "its value is not used"
        ),
    )
    event_time_field: str | None = Field(
        default=None,
        description=(
            "optional field holding the record's event time: a known field (never an "
            "unknown feature); its value is not used"
        ),
    )
    weight_field: str | None = Field(
        default=None,
        description=(
            "optional field holding a sample weight (finite, > 0; 1 when absent); the "
            "learner must accept weights (checked at start). null: every record weighs 1"
        ),
    )
    labels: list[Label] | None = Field(
        default=None,
        description=(
            "allowed labels, required for classification (exactly 2 for binary); any "
            "other label is dead-lettered (type-strict: 1 is not true); null for regression"
        ),
    )
    max_bytes: int = Field(
        default=65_536,
        ge=16,
        description=(
            "largest record value in bytes, checked before parsing; a larger one is dead-lettered"
        ),
    )
    unknown_features: Literal["reject", "ignore"] = Field(
        default="reject",
        description=(
            "a field that is neither a feature nor a configured field: reject dead-letters "
            "the record (catches producer mistakes), ignore drops the field. JSON only: with "
            "avro / json_schema the schema governs its fields and unused ones are ignored"
        ),
    )

    @property
    def feature_names(self) -> list[str]:
        """The feature names, in contract order."""
        return [f if isinstance(f, str) else f.name for f in self.features]

    @property
    def feature_configs(self) -> list[FeatureConfig]:
        """Every feature as a :class:`FeatureConfig` (plain names: number, required)."""
        return [FeatureConfig(name=f) if isinstance(f, str) else f for f in self.features]

    @model_validator(mode="after")
    def _unique(self) -> RecordSettings:
        names = self.feature_names
        if len(set(names)) != len(names):
            raise ValueError("record.features has duplicates")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("record.labels has duplicates")
        return self


_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")


class EstimatorSpec(StrictModel):
    """An allow-listed estimator by dotted path, with constructor parameters."""

    path: str = Field(description="e.g. river.linear_model.LogisticRegression")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the estimator's constructor, e.g. {max_depth: 8}",
    )

    @field_validator("path")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not _DOTTED.match(value):
            raise ValueError(f"{value!r} is not a dotted path like package.module.Class")
        # stream_trainer.testing.* passes here so that build_model, which admits a test-only
        # learner only under its environment switch, can refuse it naming the field.
        if value.split(".", maxsplit=1)[0] not in ("river", "sklearn") and not value.startswith(
            "stream_trainer.testing."
        ):
            raise ValueError(f"{value!r}: only river.* and sklearn.* estimators are allowed")
        return value


class KeySettings(StrictModel):
    """``model.scope: key``: what a record's key is, and how many key models stay in memory."""

    source: Literal["kafka_key", "field"] = Field(
        default="kafka_key",
        description=(
            "where a record's key comes from: kafka_key = the Kafka message key; field = "
            "the top-level record field model.key.field (a string or an integer; "
            "record.format json). Either way the producers must partition by that key, "
            "so each key's records are in one partition. A record without a key is "
            "dead-lettered (reason no_model_key)"
        ),
    )
    field: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "the top-level record field holding the key (model.key.source: field); a dot is "
            "part of the name, not a path into a nested object"
        ),
    )
    max_live_models: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description=(
            "key models one member holds in memory; beyond it the least recently used are "
            "written to the checkpoint store (<checkpoint.dir>/key/<hash>/) and loaded "
            "again when their key comes back"
        ),
    )
    collect_interval_s: float = Field(
        default=300.0,
        ge=0,
        description=(
            "seconds between two collections of one partition's key objects: those no "
            "retained checkpoint of the partition names and none can name again (states "
            "of keys loaded back since, orphans of a crash) are deleted from "
            "<checkpoint.dir>/key/; 0 never deletes any. Each collection lists key/ and "
            "reads the partition's retained checkpoints"
        ),
    )


class ModelSettings(StrictModel):
    """What is trained: task, learner and optional preprocessing pipeline."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description=(
            "the model's name: its registry folder and the key of its version events "
            "(lower case letters, digits, . _ -, up to 63 characters)"
        ),
    )
    task: Task = Field(
        description="what is predicted; decides the label checks, metrics and fitting learners"
    )
    learner: EstimatorSpec
    preprocessing: list[EstimatorSpec] = Field(
        default_factory=list,
        description=(
            "steps applied before the learner, in order, each a path and params like the "
            "learner (e.g. river.preprocessing.StandardScaler); empty: none"
        ),
    )
    categorical_encoding: Literal["auto", "onehot", "hashing", "native"] = Field(
        default="auto",
        description=(
            "how category features reach the learner (docs/records.md has the table). auto: "
            "River one-hot; scikit-learn partial_fit one-hot over listed categories plus an "
            "'other' column, hashed for open lists; scikit-learn fit native for learners with "
            "a categorical_features parameter, else one-hot refit per window. hashing hashes "
            "every category feature (partial_fit)"
        ),
    )
    hash_buckets: int = Field(
        default=32,
        ge=2,
        le=1 << 20,
        description="columns per category feature when it is hashed (scikit-learn only)",
    )
    scope: Literal["global", "partition", "key"] = Field(
        default="global",
        description=(
            "how many models: global = one model, one writer (other replicas are hot "
            "standbys); partition = one model per input partition, each member trains the "
            "partitions the group assigns it and hands a partition's state over when it "
            "moves (docs/scale-out.md); key = one model per record key (model.key), held "
            "in its partition's slot. partition and key need training.mode per_record or "
            "mini_batch and no topics.control"
        ),
    )
    key: KeySettings = Field(default_factory=KeySettings)

    @property
    def scoped(self) -> bool:
        """One model per partition or per key: every member trains, each owning slots of
        the shared checkpoint store (no folder lock, no lease, dynamic membership)."""
        return self.scope != "global"

    @property
    def key_field(self) -> str | None:
        """The record field the model key is read from (scope key, source field), else
        None: the decoder treats it as a known field, never an unknown feature."""
        if self.scope == "key" and self.key.source == "field":
            return self.key.field
        return None


class MiniBatchSettings(StrictModel):
    """``mini_batch`` mode: a unit is ``size`` records or whatever arrived in ``max_wait_s``."""

    size: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="records per unit, learnt with one partial_fit / learn_many call",
    )
    max_wait_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "seconds a unit may wait to fill; then the records it has are learnt, so a "
            "slow topic is still learnt promptly"
        ),
    )


_SEARCH_PATH = re.compile(r"^(learner|preprocessing\.(0|[1-9][0-9]*))\.[A-Za-z_][A-Za-z0-9_]*$")


class SearchParam(StrictModel):
    """One searched parameter: a number range (int / float, linear or log) or choices."""

    type: Literal["int", "float", "categorical"] = Field(
        description="int or float: a range from low to high; categorical: one of choices"
    )
    low: float | None = Field(default=None, description="int / float: the smallest value")
    high: float | None = Field(
        default=None, description="int / float: the largest value (included), above low"
    )
    log: bool = Field(
        default=False,
        description="int / float: sample on a log scale (low above 0), e.g. a learning rate",
    )
    choices: list[Any] | None = Field(
        default=None,
        description="categorical: the values to choose from (strings, numbers, booleans, null)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical parameter needs at least one choice")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("low / high / log apply to int and float parameters only")
            return self
        if self.choices is not None:
            raise ValueError(f"choices apply to categorical parameters only, not {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs low and high")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("an int parameter needs whole numbers for low and high")
        if self.log and self.low <= 0:
            raise ValueError(f"log: needs low above 0 (got {self.low})")
        return self

    def distribution(self) -> dict[str, Any]:
        """The parameter as plain values (what travels to a fit worker and into metadata)."""
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices or [])}
        low, high = float(self.low or 0.0), float(self.high or 0.0)  # set: see _consistent
        if self.type == "int":
            return {"type": "int", "low": int(low), "high": int(high), "log": self.log}
        return {"type": "float", "low": low, "high": high, "log": self.log}


class SearchJobsSettings(StrictModel):
    """Search trials as a Kubernetes Indexed Job sharing one study in a database."""

    enabled: bool = Field(
        default=False,
        description=(
            "a search's trials run in the pods of an Indexed Job the service creates (the "
            "chart's template), sharing an Optuna study in the database named by "
            "STREAM_TRAINER_SEARCH_DATABASE_URL(_FILE); the winner is refit here"
        ),
    )
    snapshot_dir: Path = Field(
        default=Path("/var/lib/stream-trainer/search-snapshots"),
        description=(
            "where the signed window snapshot is written; the Job's pods must mount the same "
            "volume at the same path (the chart's search.jobs.snapshots)"
        ),
    )
    job_template: Path = Field(
        default=Path("/etc/stream-trainer/search-job.yaml"),
        description=(
            "the Job manifest the chart renders; the service adds the study, the snapshot, "
            "parallelism and completions"
        ),
    )
    parallelism: int = Field(
        default=2, ge=1, le=1000, description="pods of the Job (each runs trials until done)"
    )
    wait_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description=(
            "the retrain gives up (deletes the Job, the retrain fails) when the study is not "
            "finished after this long"
        ),
    )
    poll_interval_s: float = Field(
        default=2.0, gt=0, le=60, description="how often the study and the Job are checked"
    )
    namespace: str | None = Field(
        default=None,
        description="namespace of the Job; null: the service's own (its service account's)",
    )
    api_server: str | None = Field(
        default=None,
        description=(
            "Kubernetes API URL; null: in-cluster (KUBERNETES_SERVICE_HOST / _PORT_HTTPS)"
        ),
    )
    token_file: Path = Field(
        default=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="the service account token (re-read at every call: it is rotated)",
    )
    ca_file: Path = Field(
        default=Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
        description="CA bundle that verifies the API server",
    )


class SearchSettings(StrictModel):
    """Hyperparameter search for full-batch retrains (Optuna; trials one after the other or
    in joblib worker processes)."""

    enabled: bool = Field(
        default=False,
        description="a retrain searches the space instead of fitting the configured params once",
    )
    algorithm: Literal["random", "tpe"] = Field(
        default="tpe",
        description=(
            "random: independent draws (Optuna RandomSampler); tpe: Tree-structured Parzen "
            "Estimators (Optuna TPESampler), which samples near the best trials so far"
        ),
    )
    space: dict[str, SearchParam] = Field(
        default_factory=dict,
        description=(
            "parameter path -> range or choices; a path is learner.PARAM or "
            "preprocessing.INDEX.PARAM (model.preprocessing[INDEX]), e.g. learner.max_depth: "
            "{type: int, low: 1, high: 12}; unsearched params keep the current model's values"
        ),
    )
    trials: int | None = Field(
        default=20,
        ge=1,
        le=100_000,
        description="trials per search (each one fit and one score); null: until timeout_s",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "no new trial starts after this many seconds of search (a running one finishes); "
            "null: trials bounds the search alone"
        ),
    )
    validation_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description=(
            "the newest this fraction of the training records scores the trials (time order, "
            "never shuffled); the rest trains them"
        ),
    )
    warm_start_trials: int = Field(
        default=3,
        ge=0,
        le=1000,
        description=(
            "the previous search's this many best trials are tried first (those that fit the "
            "current space), so a drift retrain does not start blind; 0: off"
        ),
    )
    seed: int = Field(default=0, ge=0, description="the sampler's seed (reproducible draws)")
    jobs: SearchJobsSettings = Field(
        default_factory=SearchJobsSettings,
        description="trials beyond this machine: a Kubernetes Indexed Job (docs/search.md)",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "trials run at once, each in a joblib (loky) worker process started by the process "
            "that searches; 1: one after the other in that process (unless memory_limit_mb "
            "is set); more than the cores slows ingestion"
        ),
    )
    memory_limit_mb: int | None = Field(
        default=None,
        ge=1,
        description=(
            "memory a trial may allocate on top of what its worker process holds when the "
            "trial starts (Linux RLIMIT_DATA: heap and private mappings); a trial over it "
            "fails alone (MemoryError, or its worker dies) and the search goes on. Trials "
            "then run in worker processes even with workers: 1; null: no cap"
        ),
    )

    @field_validator("space")
    @classmethod
    def _paths(cls, value: dict[str, SearchParam]) -> dict[str, SearchParam]:
        for path in value:
            if not _SEARCH_PATH.match(path):
                raise ValueError(
                    f"{path!r} is not a parameter path like learner.max_depth or "
                    "preprocessing.0.with_mean"
                )
        return value

    @model_validator(mode="after")
    def _budget(self) -> SearchSettings:
        if self.enabled and not self.space:
            raise ValueError("space: an enabled search needs at least one parameter")
        if self.trials is None and self.timeout_s is None:
            raise ValueError("trials / timeout_s: set at least one, or the search never ends")
        return self


ClassificationMetric = Literal["accuracy", "f1", "macro_f1", "log_loss", "roc_auc"]
RegressionMetric = Literal["mae", "rmse", "r2"]


class SelectionCandidate(StrictModel):
    """One configuration in an online model selection: overrides of the model's params."""

    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description=(
            "a short label for metrics and version metadata (letters, digits, . _ -); "
            "null: c<INDEX>"
        ),
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "parameter path -> value, merged into the configured model (paths as in "
            "training.full_batch.search.space: learner.PARAM or preprocessing.INDEX.PARAM); "
            "empty: the configured model itself"
        ),
    )

    @field_validator("params")
    @classmethod
    def _paths(cls, value: dict[str, Any]) -> dict[str, Any]:
        for path in value:
            if not _SEARCH_PATH.match(path):
                raise ValueError(
                    f"{path!r} is not a parameter path like learner.l2 or preprocessing.0.with_mean"
                )
        return value


class SelectionSettings(StrictModel):
    """Online model selection (per_record, mini_batch): candidates learn side by side.

    Each is scored prequentially; successive halving keeps the better half every rung, and
    the leader (best on recent records) is the model that is checkpointed and published.
    """

    enabled: bool = Field(
        default=False,
        description=(
            "train the candidates side by side and publish the leader instead of one "
            "configured model (per_record and mini_batch only)"
        ),
    )
    method: Literal["halving"] = Field(
        default="halving",
        description=(
            "halving: successive halving on the live stream (every rung_records records the "
            "worse half of the live candidates stops, down to min_live; docs/selection.md)"
        ),
    )
    candidates: list[SelectionCandidate] = Field(
        default_factory=list,
        description="the configurations to choose from, at least 2 when enabled",
    )
    max_live: int = Field(
        default=4,
        ge=1,
        le=64,
        description=(
            "the most candidates learning at once: the cost bound (each costs about one "
            "model's predict and learn); the first rung runs every candidate, so it must "
            "hold them all"
        ),
    )
    min_live: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "halving stops here; above 1 keeps alternatives learning, so the leader can "
            "change after a drift (a hedge at about min_live times one model's cost)"
        ),
    )
    rung_records: int = Field(
        default=2000,
        ge=10,
        le=100_000_000,
        description=(
            "records per rung: each live candidate is scored on a rung's records before the "
            "worse half stops; the leader is re-chosen every tenth of a rung (mini_batch: at "
            "least every training.mini_batch.size records; a multiple of it keeps units whole)"
        ),
    )
    metric: ClassificationMetric | RegressionMetric | None = Field(
        default=None,
        description=(
            "the metric candidates are ranked by; null: the first of evaluation.metrics "
            "(the service's prequential metric)"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> SelectionSettings:
        if not self.enabled:
            return self
        if len(self.candidates) < 2:
            raise ValueError("candidates: an enabled selection needs at least 2 candidates")
        if len(self.candidates) > self.max_live:
            raise ValueError(
                f"candidates: {len(self.candidates)} candidates but max_live is "
                f"{self.max_live} (halving runs every candidate in its first rung)"
            )
        if self.min_live > len(self.candidates):
            raise ValueError(
                f"min_live: {self.min_live} is more than the {len(self.candidates)} candidates"
            )
        names = self.candidate_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"candidates: names must be unique ({duplicates} repeat)")
        return self

    def candidate_names(self) -> list[str]:
        """Each candidate's name, ``c<INDEX>`` where none is given."""
        return [c.name or f"c{i}" for i, c in enumerate(self.candidates)]


class FullBatchSettings(StrictModel):
    """``full_batch`` mode: a bounded window and the triggers that refit on it."""

    window_records: int = Field(
        default=10_000,
        ge=10,
        description=(
            "the training window: a retrain fits on the most recent this many records "
            "(8 bytes per feature per record in memory); larger: slower, steadier fits"
        ),
    )
    retrain_every_records: int | None = Field(
        default=5_000,
        ge=1,
        description="retrain after this many records since the last retrain; null: never by count",
    )
    retrain_every_seconds: float | None = Field(
        default=None,
        gt=0,
        description=(
            "retrain every this many seconds if at least one record was learnt since the "
            "last retrain (an unchanged window is not refitted); null: never by time"
        ),
    )
    retrain_on_drift: bool = Field(
        default=True,
        description=(
            "retrain when drift is detected, on a window restarted at the detection "
            "(a refit on the old concept would restore it)"
        ),
    )
    min_records: int = Field(
        default=100,
        ge=1,
        description="a due retrain waits until the window holds at least this many records",
    )
    fit_in_worker: bool = Field(
        default=True,
        description=(
            "fit in a child process (no GIL shared with ingestion); false: on a thread of "
            "the service, which slows ingestion during pure-Python fits"
        ),
    )
    fit_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description=(
            "the fit worker's nice value (0-19): ingestion gets the CPU first and the fit "
            "takes longer; 0 gives the fit an equal share"
        ),
    )
    search: SearchSettings = Field(default_factory=SearchSettings)


class TrainingSettings(StrictModel):
    """The training mode (chosen once) and its parameters."""

    mode: TrainingMode = Field(
        description=(
            "how the model learns, chosen once per model: per_record (River learn_one), "
            "mini_batch (partial_fit / learn_many per unit) or full_batch (fit on a window)"
        )
    )
    mini_batch: MiniBatchSettings = Field(default_factory=MiniBatchSettings)
    full_batch: FullBatchSettings = Field(default_factory=FullBatchSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)


class EvaluationSettings(StrictModel):
    """Prequential (test-then-train) evaluation."""

    metrics: list[ClassificationMetric | RegressionMetric] | None = Field(
        default=None,
        description=(
            "prequential metrics to compute; null: accuracy, f1 (binary), accuracy, "
            "macro_f1 (multiclass), mae, rmse, r2 (regression). Gates compare on the first "
            "(publishes: the first that is not log_loss / roc_auc)"
        ),
    )
    window: int = Field(
        default=1000,
        ge=10,
        description=(
            'records in the rolling window (metric scope "window"); scope "total" covers '
            "every record since the start"
        ),
    )


class DriftSettings(StrictModel):
    """Concept-drift detection on the prequential error."""

    enabled: bool = Field(
        default=True, description="run the detector (needed for retrain_on_drift)"
    )
    detector: Literal["ADWIN", "PageHinkley", "KSWIN"] = Field(
        default="ADWIN", description="the River drift detector used on the prequential error"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "keyword arguments of the detector, e.g. {delta: 0.002} for ADWIN; an unknown "
            "one fails at start; empty: River's defaults"
        ),
    )


class DeadLetterSettings(StrictModel):
    """Bad-record breaker: a flood of invalid records halts the partition."""

    max_consecutive_invalid: int = Field(
        default=1000,
        ge=1,
        description=(
            "halt a partition after this many invalid records in a row (resume it with "
            "stream-trainer control resume once the producer is fixed)"
        ),
    )
    max_invalid_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "halt a partition when more than this share (0-1) of its last ratio_window "
            "records is invalid; 1 turns the ratio check off"
        ),
    )
    ratio_window: int = Field(
        default=10_000,
        ge=10,
        description=(
            "records per partition the ratio is taken over; checked once a partition has "
            "seen this many, so a few bad records at the start never trip it"
        ),
    )


class ObjectStoreSettings(StrictModel):
    """How to reach the object store of ``s3://`` / ``gs://`` / ``az://`` locations
    (registry.root). For gs:// and az:// only endpoint_url, ca_file and timeout_seconds
    apply: their credentials come from the environment / workload identity."""

    endpoint_url: str | None = Field(
        default=None,
        description=(
            "S3 API endpoint of an S3-compatible server (MinIO, Ceph, SeaweedFS), e.g. "
            "https://minio.storage:9000; null: AWS S3 of the region. For gs:// / az:// "
            "an emulator's or sovereign cloud's base URL. http:// is allowed only when "
            "written here"
        ),
    )
    region: str | None = Field(
        default=None,
        description="region of the bucket; null: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1",
    )
    path_style: bool = Field(
        default=False,
        description=(
            "path-style requests (endpoint/bucket/key), as most S3-compatible servers "
            "want; false: virtual-hosted style (bucket.endpoint/key), as AWS wants"
        ),
    )
    ca_file: Path | None = Field(
        default=None,
        description="PEM file of a private CA to trust (added to the system roots)",
    )
    access_key_id_file: Path | None = Field(
        default=None,
        description=(
            "file holding the access key id (a mounted Secret); null: AWS_ACCESS_KEY_ID, a "
            "web identity token (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN) or instance "
            "metadata. Keys are never taken from this config file"
        ),
    )
    secret_access_key_file: Path | None = Field(
        default=None,
        description="file holding the secret access key; null: AWS_SECRET_ACCESS_KEY or as above",
    )
    session_token_file: Path | None = Field(
        default=None,
        description="file holding a session token for temporary keys; null: AWS_SESSION_TOKEN",
    )
    timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "bound on one request and on its retries, in seconds (a slow or unreachable "
            "store then fails, not hangs)"
        ),
    )
    startup_wait_seconds: float = Field(
        default=60.0,
        ge=0,
        description=(
            "at start, how long a registry store that cannot be reached (network error, "
            "timeout, 5xx) is retried before the start fails; a refusal (bad credentials, "
            "no such bucket) fails the start at once"
        ),
    )

    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "how long the writer's lease on an s3:// registry or checkpoint.dir lasts without "
            "a publish or checkpoint; a "
            "member that took the Kafka lease over from a crashed or cut-off writer waits at "
            "most this long, then fences it. Must exceed the writers' clock skew"
        ),
    )

    @model_validator(mode="after")
    def _key_pair(self) -> ObjectStoreSettings:
        if (self.access_key_id_file is None) != (self.secret_access_key_file is None):
            raise ValueError(
                "object_store: set access_key_id_file and secret_access_key_file together"
            )
        return self


class CheckpointSettings(StrictModel):
    """Signed, atomic checkpoints: the source of truth for offsets."""

    dir: StoreUrl | Path = Field(
        union_mode="left_to_right",
        description=(
            "folder of this member's checkpoints (and quarantine/), locked by one process "
            "and surviving restarts (on Kubernetes, the PVC); or s3://bucket/prefix, written "
            "by the one holder of its lease object, so any pod can take over (gs:// and "
            "az:// too; see object_store and docs/object-storage.md)"
        ),
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _known_scheme(cls, value: Any) -> Any:
        return known_store_scheme(value)

    every_records: int | None = Field(
        default=100_000,
        ge=1,
        description=("checkpoint after this many records since the last one; null: never by count"),
    )
    every_seconds: float | None = Field(
        default=10.0,
        gt=0,
        description=(
            "checkpoint at least this often, in seconds, once a record was processed since "
            "the last one; null: never by time. Offsets are "
            "committed only after a checkpoint, so it bounds how stale committed offsets are"
        ),
    )
    keep_last: int = Field(
        default=3,
        ge=1,
        le=1000,
        description=(
            "checkpoints kept (1-1000), older ones deleted; each is a fallback when a "
            "newer one fails verification"
        ),
    )
    hmac_key: SecretStr | None = Field(
        default=None,
        description=(
            "key that signs checkpoints and model versions; set via "
            "STREAM_TRAINER_CHECKPOINT__HMAC_KEY or hmac_key_file, never in the file"
        ),
    )
    hmac_key_file: Path | None = Field(
        default=None,
        description=(
            "file holding the HMAC key (e.g. a mounted Secret), whitespace stripped; used "
            "when hmac_key is not set"
        ),
    )
    allow_unsigned: bool = Field(
        default=False,
        description=(
            "run without a key (unsigned checkpoints and versions), or with one accept "
            "unsigned checkpoints; for laptops and migrations, not production"
        ),
    )
    accept_retention_gap: bool = Field(
        default=False,
        description=(
            "start even when retention deleted offsets the checkpoint needs (those records "
            "are skipped and counted); false: refuse to start, naming the partitions"
        ),
    )

    def key(self) -> bytes | None:
        """The HMAC key, or None when none is configured."""
        secret = _read_secret(self.hmac_key, self.hmac_key_file)
        return secret.encode("utf-8") if secret else None

    @model_validator(mode="after")
    def _key_or_unsigned(self) -> CheckpointSettings:
        if self.hmac_key is None and self.hmac_key_file is None and not self.allow_unsigned:
            raise ValueError(
                "no checkpoint HMAC key: set STREAM_TRAINER_CHECKPOINT__HMAC_KEY or "
                "checkpoint.hmac_key_file, or checkpoint.allow_unsigned: true (not for production)"
            )
        return self


class GateSettings(StrictModel):
    """Champion/challenger promotion gate."""

    enabled: bool = Field(
        default=True,
        description=(
            "compare each candidate with the champion before it replaces it; false: "
            "every publish and every retrain's candidate wins unless its parameters are "
            "not finite (NaN / inf)"
        ),
    )
    margin: float = Field(
        default=0.01,
        ge=0,
        description=(
            "how much worse than the champion, in the compared metric's units, a candidate "
            "may score and still win; 0: never worse"
        ),
    )
    holdout_records: int = Field(
        default=1000,
        ge=10,
        description=(
            "recent records both models are scored on (a full retrain holds out at most a "
            "quarter of its window); more: steadier verdicts on older data"
        ),
    )


class MlflowSettings(StrictModel):
    """Export of every published version to an MLflow model registry (off the poll loop)."""

    enabled: bool = Field(
        default=False,
        description=(
            "register each published version in MLflow and keep its `champion` alias on our "
            "champion; a failed export is retried and never blocks training"
        ),
    )
    tracking_uri: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description=(
            "MLflow tracking server URL, e.g. http://mlflow:5000; it must proxy artifacts "
            "(`mlflow server --serve-artifacts`, the default). Required when enabled"
        ),
    )
    registered_model_name: str | None = Field(
        default=None,
        min_length=1,
        # Quotes would break the search filters the export uses to find its versions.
        pattern=r"^[^'\"]+$",
        description="name of the registered model in MLflow (no quotes); null: model.name",
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "MLflow experiment holding one run per exported version; null: "
            "stream-trainer/<model.name>"
        ),
    )
    token: SecretStr | None = Field(
        default=None,
        description=(
            "bearer token (as MLFLOW_TRACKING_TOKEN); prefer env "
            "(STREAM_TRAINER_REGISTRY__MLFLOW__TOKEN) or token_file to the config file; "
            "masked whenever the config is printed"
        ),
    )
    token_file: Path | None = Field(
        default=None,
        description="file holding the bearer token (e.g. a mounted Secret), whitespace stripped",
    )
    username: str | None = Field(
        default=None,
        min_length=1,
        description="HTTP basic auth user (MLflow's basic-auth app); null: none",
    )
    password: SecretStr | None = Field(
        default=None,
        description=(
            "HTTP basic auth password; prefer env (STREAM_TRAINER_REGISTRY__MLFLOW__PASSWORD) "
            "or password_file; masked whenever the config is printed"
        ),
    )
    password_file: Path | None = Field(
        default=None,
        description="file holding the basic auth password, whitespace stripped",
    )
    ssl_ca_location: Path | None = Field(
        default=None,
        description="PEM file of the CA that verifies an https server; null: the system store",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="seconds one MLflow request may take"
    )
    retry_backoff_initial_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "seconds before the first retry after a failed export; doubled after each "
            "failure up to retry_backoff_max_s. Retries go on until the export succeeds"
        ),
    )
    retry_backoff_max_s: float = Field(
        default=60.0, gt=0, description="longest wait between two export attempts, seconds"
    )
    reconcile_interval_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "seconds between checks that every version and the champion alias are in MLflow "
            "(catches a promote or rollback whose own alias move failed)"
        ),
    )

    @model_validator(mode="after")
    def _complete(self) -> MlflowSettings:
        if self.enabled and self.tracking_uri is None:
            raise ValueError("tracking_uri is required when enabled")
        if (
            self.tracking_uri is not None
            and "@" in self.tracking_uri.split("://", 1)[1].split("/", 1)[0]
        ):
            # Credentials in the URL would be printed with the config and in every error.
            raise ValueError(
                "tracking_uri must not carry credentials: use token / token_file or "
                "username with password / password_file"
            )
        has_password = self.password is not None or self.password_file is not None
        if (self.username is not None) != has_password:
            raise ValueError("basic auth needs both username and password (or password_file)")
        has_token = self.token is not None or self.token_file is not None
        if has_token and self.username is not None:
            raise ValueError("use either a token or username/password, not both")
        if self.retry_backoff_max_s < self.retry_backoff_initial_s:
            raise ValueError("retry_backoff_max_s must be >= retry_backoff_initial_s")
        return self

    def secrets(self) -> list[str]:
        """The token and password as read (for log masking); empty when none is set."""
        found = (
            _read_secret(self.token, self.token_file),
            _read_secret(self.password, self.password_file),
        )
        return [value for value in found if value]

    def authorization(self) -> str | None:
        """The Authorization header value (holds the secret: never log it), or None."""
        token = _read_secret(self.token, self.token_file)
        if token:
            return f"Bearer {token}"
        if self.username is not None:
            password = _read_secret(self.password, self.password_file) or ""
            raw = f"{self.username}:{password}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        return None


class RegistrySettings(StrictModel):
    """Where model versions are published and when."""

    root: StoreUrl | Path = Field(
        union_mode="left_to_right",
        description=(
            "where versions are published (<root>/<model>/versions/<n>/): a folder, "
            "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix (see "
            "object_store and docs/object-storage.md); serving "
            "readers load from it, so share it with them"
        ),
    )
    publish_every_records: int | None = Field(
        default=None,
        ge=1,
        description="publish after this many records since the last version; null: never by count",
    )
    publish_every_seconds: float | None = Field(
        default=300.0,
        gt=0,
        description=(
            "publish every this many seconds if at least one record was learnt since the "
            "last version; null: never by time"
        ),
    )
    publish_after_retrain: bool = Field(
        default=True,
        description="publish right after a full retrain replaced the model (full_batch)",
    )
    keep_last: int = Field(
        default=20,
        ge=1,
        description="versions kept on disk; older ones are deleted, never the champion",
    )
    gate: GateSettings = Field(default_factory=GateSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)

    @field_validator("root", mode="before")
    @classmethod
    def _known_scheme(cls, value: Any) -> Any:
        return known_store_scheme(value)


class HttpSettings(StrictModel):
    """The one HTTP port: /metrics, /healthz, /readyz."""

    enabled: bool = Field(
        default=True,
        description="serve the three endpoints; the Helm chart's probes need them",
    )
    host: str = Field(
        default="0.0.0.0",  # noqa: S104 - a pod must listen on its own interface
        description="address to listen on: 0.0.0.0 every interface, 127.0.0.1 this host only",
    )
    port: int = Field(
        default=9100, ge=0, le=65535, description="TCP port of the endpoints; 0: any free port"
    )
    healthz_max_age_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "/healthz fails once the poll loop has not turned for this many seconds (never "
            "for a broker outage); keep it above the slowest unit"
        ),
    )


class LoggingSettings(StrictModel):
    """JSON lines on stdout."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="least severe level logged, librdkafka's lines included"
    )
    format: Literal["json", "text"] = Field(
        default="json",
        description="json: one JSON object per line, for collectors; text: for a terminal",
    )


class ShutdownSettings(StrictModel):
    """Graceful stop: everything after SIGTERM finishes within ``timeout_s``."""

    timeout_s: float = Field(
        default=25.0,
        gt=0,
        le=600,
        description=(
            "seconds within which a stop finishes the unit, checkpoints, commits and exits; "
            "the Helm chart sets terminationGracePeriodSeconds above it"
        ),
    )


class RoutingSettings(StrictModel):
    """How a serving system finds the model of a key (scoped models; docs/scale-out.md)."""

    partitioner: Literal["murmur2", "crc32"] = Field(
        default="murmur2",
        description=(
            "the producers' partitioner, published with every scoped version so readers "
            "route a key to its partition's model: murmur2 = Java clients' default and "
            "librdkafka's murmur2_random; crc32 = librdkafka's default consistent_random"
        ),
    )


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    kafka: KafkaSettings
    topics: TopicsSettings
    record: RecordSettings
    model: ModelSettings
    training: TrainingSettings
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    dead_letter: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    checkpoint: CheckpointSettings
    registry: RegistrySettings
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs).
        environ = _ENVIRONMENT.get()
        source = _MappingEnvSource(settings_cls, os.environ if environ is None else environ)
        return (source, init_settings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        classification = self.model.task != "regression"
        if classification and not self.record.labels:
            raise ValueError(
                "record.labels: a classification task needs the allowed labels declared"
            )
        binary = self.model.task == "binary_classification"
        if binary and self.record.labels and len(self.record.labels) != 2:
            raise ValueError("record.labels: binary_classification needs exactly 2 labels")
        for metric in self.evaluation_metrics():
            if classification != (metric not in ("mae", "rmse", "r2")):
                raise ValueError(f"evaluation.metrics: {metric!r} does not fit {self.model.task}")
        search = self.training.full_batch.search
        if search.enabled:
            if self.training.mode != "full_batch":
                raise ValueError(
                    "training.full_batch.search.enabled: only training.mode full_batch "
                    f"searches (this model runs {self.training.mode})"
                )
            steps = len(self.model.preprocessing)
            for path in search.space:
                if path.startswith("preprocessing.") and int(path.split(".")[1]) >= steps:
                    raise ValueError(
                        f"training.full_batch.search.space.{path}: model.preprocessing has "
                        f"{steps} step(s)"
                    )
        self._check_selection()
        self._check_scope()
        if self.record.format != "json" and self.schema_registry.url is None:
            raise ValueError(
                f"record.format {self.record.format} needs schema_registry.url (the schemas "
                "of Confluent wire-format values live there)"
            )
        return self

    def _check_scope(self) -> None:
        if not self.model.scoped:
            return
        if self.training.mode == "full_batch":
            raise ValueError(
                f"model.scope: {self.model.scope} scope trains per_record or mini_batch "
                "(full_batch retrains per partition or key are not built: one fit worker "
                "would serve every one in turn)"
            )
        if len(self.topics.input) != 1:
            raise ValueError(
                f"topics.input: {self.model.scope} scope reads one topic (models per "
                "partition of it; readers route keys by its partition count)"
            )
        if self.topics.control:
            raise ValueError(
                f"topics.control: control commands are not supported with model.scope "
                f"{self.model.scope} yet (each member would act on its own partitions "
                "only); set it to null"
            )
        key = self.model.key
        if self.model.scope == "key" and key.source == "field":
            if key.field is None:
                raise ValueError("model.key.field: model.key.source field needs the field name")
            if self.record.format != "json":
                raise ValueError(
                    "model.key.source: field reads the key from a JSON value; with "
                    f"record.format {self.record.format} use kafka_key"
                )

    def _check_selection(self) -> None:
        selection = self.training.selection
        if not selection.enabled:
            return
        if self.training.mode not in ("per_record", "mini_batch"):
            raise ValueError(
                "training.selection.enabled: online selection needs training.mode per_record "
                f"or mini_batch (this model runs {self.training.mode}; full_batch searches: "
                "training.full_batch.search)"
            )
        metric = selection.metric
        if metric is not None and (self.model.task != "regression") != (
            metric not in ("mae", "rmse", "r2")
        ):
            raise ValueError(
                f"training.selection.metric: {metric!r} does not fit {self.model.task}"
            )
        steps = len(self.model.preprocessing)
        for i, candidate in enumerate(selection.candidates):
            for path in candidate.params:
                if path.startswith("preprocessing.") and int(path.split(".")[1]) >= steps:
                    raise ValueError(
                        f"training.selection.candidates[{i}].params.{path}: model.preprocessing "
                        f"has {steps} step(s)"
                    )

    def selection_metric(self) -> str:
        """The metric online selection ranks candidates by."""
        return self.training.selection.metric or self.evaluation_metrics()[0]

    def evaluation_metrics(self) -> list[str]:
        """The configured metrics, or the task's defaults."""
        if self.evaluation.metrics:
            return list(self.evaluation.metrics)
        if self.model.task == "regression":
            return ["mae", "rmse", "r2"]
        return (
            ["accuracy", "f1"]
            if self.model.task == "binary_classification"
            else [
                "accuracy",
                "macro_f1",
            ]
        )

    def masked(self) -> dict[str, Any]:
        """The effective config as JSON-able data with every secret masked."""
        return self.model_dump(mode="json")

    def lease_topic(self) -> str:
        """The lease topic (see ``topics.lease``)."""
        return self.topics.lease or f"{self.kafka.group_id}.lease"

    def group_instance_id(self, hostname: str) -> str:
        """``kafka.group_instance_id``, or ``<hostname>-<digest of checkpoint.dir>``: stable
        across restarts of one member, distinct for two members on one host."""
        if self.kafka.group_instance_id is not None:
            return self.kafka.group_instance_id
        where = self.checkpoint.dir
        folder = (str(where.resolve()) if isinstance(where, Path) else where).encode()
        return f"{hostname}-{hashlib.sha256(folder).hexdigest()[:10]}"

    def config_hash(self) -> str:
        """sha256 of what determines the model (not connection details or secrets)."""
        relevant = self.model_dump(
            mode="json", include={"record", "model", "training", "evaluation", "drift"}
        )
        # Fields added since checkpoints were first written count only when set away from
        # their default, so an upgrade does not disown the checkpoints it finds.
        for (section, key), default in _ADDED_FIELD_DEFAULTS.items():
            if relevant[section].get(key) == default:
                del relevant[section][key]
        # The search decides how later candidates are found, not what the current model or
        # state is: enabling or tuning it keeps the checkpoint (and pre-search checkpoints).
        relevant["training"]["full_batch"].pop("search", None)
        # Online selection is part of the state (every candidate is checkpointed, the leader
        # is the model): an enabled one counts, so a checkpoint of other candidates is not
        # resumed as if it were these. Disabled, it counts for nothing (existing hashes hold).
        if not self.training.selection.enabled:
            relevant["training"].pop("selection", None)
        else:
            # A cap checked at start, not a decision input: raising it keeps the checkpoint.
            relevant["training"]["selection"].pop("max_live", None)
        blob = json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


_ADDED_FIELD_DEFAULTS: dict[tuple[str, str], Any] = {
    ("model", "categorical_encoding"): "auto",
    ("model", "hash_buckets"): 32,
}


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: ``path.to.field: message (got value)``; secrets never shown."""
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in item["loc"]) or "(root)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the configuration reference)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"{location}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def settings_from_mapping(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> Settings:
    """Validate a config mapping (e.g. a parsed YAML file); env overrides apply.

    Raises ConfigError naming every offending field.
    """
    token = _ENVIRONMENT.set(env)
    try:
        return Settings(**dict(data))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
    except SettingsError as error:
        # An environment value that could not be decoded (see _MappingEnvSource).
        cause = error.__cause__ if isinstance(error.__cause__, _EnvValueError) else error
        raise ConfigError(f"invalid configuration: {cause}") from None
    finally:
        _ENVIRONMENT.reset(token)


def _path_fields(model: type[BaseModel]) -> list[tuple[str, ...]]:
    """Key paths of every ``Path`` field of ``model`` and its nested sections."""
    found: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        options = typing.get_args(annotation) or (annotation,)
        if Path in options:
            found.append((name,))
        for option in options:
            if isinstance(option, type) and issubclass(option, BaseModel):
                found += [(name, *rest) for rest in _path_fields(option)]
    return found


def resolve_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``data`` (a config file's mapping) with every relative path field made absolute
    against ``base``, the config file's folder, so a config means the same files
    whatever the working directory. Values from the environment are left as given."""
    out = copy.deepcopy(dict(data))
    for keys in _path_fields(Settings):
        section: Any = out
        for key in keys[:-1]:
            section = section.get(key) if isinstance(section, dict) else None
        value = section.get(keys[-1]) if isinstance(section, dict) else None
        if (
            isinstance(value, str)
            and value
            and "://" not in value  # an object-store URL, not a path
            and not Path(value).expanduser().is_absolute()
        ):
            section[keys[-1]] = str(base / value)
    return out


def load_settings(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load the YAML file at ``path`` (or ``$STREAM_TRAINER_CONFIG``) plus env overrides.

    Relative paths in the file are relative to the file's folder (:func:`resolve_paths`).

    Raises ConfigError with a message naming the file or the offending fields.
    """
    environ = os.environ if env is None else env
    if path is None:
        path = environ.get(CONFIG_ENV_VAR)
    if not path:
        raise ConfigError(f"no config file: pass --config FILE or set {CONFIG_ENV_VAR}")
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {file} is not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a mapping at the top level")
    data = resolve_paths(data, file.absolute().parent)
    filtered_env = {k: v for k, v in environ.items() if k.upper() != CONFIG_ENV_VAR}
    return settings_from_mapping(data, env=filtered_env)
