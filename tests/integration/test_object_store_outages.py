"""Object-store outages against a real S3 server (SeaweedFS, its own instance: stopping
the session's would take it from other tests): a serving reader that needs an artifact
while the server is down retries and loads the version once it is back; a missing
artifact still fails at once."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from confluent_kafka import Producer

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.publishing.events import VersionEventPublisher, version_event
from stream_trainer.publishing.reader import ModelReader
from stream_trainer.publishing.registry import open_registry
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import BrokerHandle, new_topic
from tests.harness import settings_for
from tests.integration.test_object_store import KEY, MODEL
from tests.served_model import VersionModel

pytestmark = pytest.mark.integration


def test_a_reader_retries_an_artifact_while_the_store_is_down_and_loads_it_after(
    tansu_broker: BrokerHandle, tmp_path: Path
) -> None:
    with SeaweedFS(bucket="reader-outage") as server:
        url = f"s3://{server.bucket}/models"
        admin = settings_for(server, tmp_path, server.admin).model_copy(
            update={"timeout_seconds": 2.0}
        )
        registry = open_registry(url, MODEL, KEY, 10, admin)
        topic = new_topic(tansu_broker, prefix="versions")
        producer = Producer({"bootstrap.servers": tansu_broker.bootstrap_servers, "acks": "all"})
        events = VersionEventPublisher(producer, topic, MODEL)
        first = registry.publish(pickle.dumps(VersionModel(1)), {}, promote=True)
        second = registry.publish(pickle.dumps(VersionModel(2)), {}, promote=True)
        events.publish(first, registry)

        reading: ObjectStoreSettings = settings_for(server, tmp_path, server.reader)
        reader = ModelReader(
            {"bootstrap.servers": tansu_broker.bootstrap_servers},
            topic,
            MODEL,
            KEY,
            store_settings=reading.model_copy(update={"timeout_seconds": 2.0}),
        )
        reader.start()
        try:
            assert reader.wait_for_version(1, 60.0), reader.error
            server.stop()
            # The event arrives, its artifact cannot be read. Sent as the trainer would, but
            # without the sent-marker (the store is down: it could not be written).
            producer.produce(
                topic, key=MODEL.encode(), value=version_event(second.metadata, second.artifact_uri)
            )
            assert producer.flush(30.0) == 0
            assert reader.wait_for_store_retries(2, 60.0), reader.error
            assert reader.version == 1 and reader.failures == 0  # still serving, not given up
            server.start()  # the same ports and data
            assert reader.wait_for_version(2, 120.0), (reader.failures, reader.error)
            assert reader.predict_one({}) == 2
            assert reader.failures == 0
            retries = reader.store_retries

            # A version whose artifact is gone for good fails at once, without retries.
            third = registry.publish(pickle.dumps(VersionModel(3)), {}, promote=True)
            open_registry_store = registry.store  # type: ignore[attr-defined]
            open_registry_store.delete(f"{MODEL}/versions/{third.version:08d}/model.pkl")
            events.publish(third, registry)
            assert reader.wait_for_failures(1, 60.0)
            assert reader.store_retries == retries
            assert reader.version == 2
        finally:
            reader.stop()
