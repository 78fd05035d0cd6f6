"""Serve the current champion of a model, hot-reloaded from the versions topic.

    STREAM_TRAINER_REGISTRY_KEY=... python examples/serve_reader.py \\
        --bootstrap-servers localhost:9092 --topic model-versions --model my-model

The key is the one the service signs versions with: the same key as its checkpoints
(``STREAM_TRAINER_CHECKPOINT__HMAC_KEY``). It is read from ``STREAM_TRAINER_REGISTRY_KEY``,
falling back to ``STREAM_TRAINER_CHECKPOINT__HMAC_KEY``; without either, only sha256 is
checked (``--allow-unsigned``), which detects corruption but not tampering.

Reads JSON feature objects from stdin, one per line, as the records carry them (categories
as strings, missing features left out or null where the contract allows), and prints the
prediction of the model being served at that moment, with its version.

With the registry in a bucket (``registry.root: s3://…``) the event's ``s3://`` URL is
read with this process's own keys (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a web
identity token, ...; read access is enough) and ``--s3-endpoint`` / ``--s3-region`` /
``--s3-path-style`` for an S3-compatible server: nothing is shared with the trainer but
the bucket and the versions topic.

Started before the service has published anything, it waits for a first version up to
``--wait-s`` (default 15 minutes: longer than the shipped configs take to publish one,
whose time triggers are 10 minutes at most), saying every minute what it waits for.

``--scope partition`` serves a ``model.scope: partition`` model (configs/partition-scope.yaml):
one champion per partition slot of the input topic. Each stdin line is then
``{"key": "<string>", "features": {...}}``: the record key as the producers send it (its
UTF-8 bytes are hashed with the model's published ``routing.partitioner``, so the key is
routed to the partition, and model, it was produced to) and the features as above. Each
output line is ``{"key": ..., "slot": "<topic>:<p>", "version": N, "prediction": ...}``; a
key whose slot has no champion yet gets ``"version": null, "prediction": null`` and an
``"error"``, and serving goes on. The wait is for a first champion of any slot, then for
the events already on the topic, so a key without a model means there is none yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.publishing.reader import ModelReader, NoModelForKey
from stream_trainer.state.objectstore import is_store_url

KEY_ENV_VARS = ("STREAM_TRAINER_REGISTRY_KEY", "STREAM_TRAINER_CHECKPOINT__HMAC_KEY")
# Above the longest time to a first version of configs/*.yaml (publish or retrain time
# trigger + checkpoint interval); tests/unit/test_examples.py keeps the two in step.
DEFAULT_WAIT_S = 900.0
PROGRESS_EVERY_S = 60.0
SCOPED_LINE = '{"key": "<string>", "features": {...}}'


def wait_for_first_version(reader: ModelReader, wait_s: float, what: str) -> bool:
    """Wait until ``reader`` serves a version (True) or ``wait_s`` passed (False).

    Says on stderr what it waits for, then again every ``PROGRESS_EVERY_S``: a service
    publishes its first version only after its first publish (or retrain) period.
    """
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        print(f"waiting for a first version of {what} ({left:.0f}s left)", file=sys.stderr)
        if reader.wait_until_serving(min(left, PROGRESS_EVERY_S)):
            return True


def predict_keyed(reader: ModelReader, line: str) -> dict[str, Any]:
    """The output object for one ``--scope partition`` input line (see the module
    docstring): the key's slot, that slot's version and its prediction, or an ``error``
    when the slot has no champion. ValueError for a line that is not ``SCOPED_LINE``."""
    request = json.loads(line)
    if (
        not isinstance(request, dict)
        or not isinstance(request.get("key"), str)
        or not isinstance(request.get("features"), dict)
    ):
        raise ValueError(f"expected one JSON object per line, {SCOPED_LINE}: {line.strip()}")
    key = request["key"].encode("utf-8")
    out: dict[str, Any] = {"key": request["key"], "slot": None, "version": None}
    try:
        out["slot"] = reader.slot_for_key(key)
        prediction = reader.predict_record(request["features"], key=key)
    except NoModelForKey as missing:
        return {**out, "prediction": None, "error": str(missing)}
    # The version of the model just used: the one loaded for the slot.
    out["version"] = reader.loaded().get(out["slot"])
    return {**out, "prediction": prediction}


def serve_keyed(reader: ModelReader, wait_s: float) -> int:
    """Serve ``SCOPED_LINE`` lines from stdin once the events already on the topic are
    read (up to ``wait_s``): before that, a key without a model may only be unread."""
    if not reader.wait_until_caught_up(wait_s):
        print("versions topic not read to its end yet: some slots may be missing", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(predict_keyed(reader, line), default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"stdin, one JSON object per line: the features (--scope global), or "
        f"{SCOPED_LINE} (--scope partition: the key picks its partition's model)",
    )
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True, help="the service's topics.versions")
    parser.add_argument("--model", required=True, help="the service's model.name")
    parser.add_argument(
        "--registry-root",
        default=None,
        help="where the registry volume is mounted here, if not at the service's path "
        "(or an s3:// URL of the same registry)",
    )
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible server's endpoint")
    parser.add_argument("--s3-region", default=None)
    parser.add_argument("--s3-path-style", action="store_true")
    parser.add_argument("--allow-unsigned", action="store_true")
    parser.add_argument(
        "--scope",
        choices=("global", "partition"),
        default="global",
        help="the service's model.scope (default global): partition reads "
        f"{SCOPED_LINE} lines and prints each key's slot and its version",
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=DEFAULT_WAIT_S,
        help="how long to wait for a first version before giving up, exit 1 "
        f"(default {DEFAULT_WAIT_S:.0f}: above the shipped configs' publish periods)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    secret = next((os.environ[name] for name in KEY_ENV_VARS if os.environ.get(name)), None)
    if secret is None and not args.allow_unsigned:
        parser.error(f"set {KEY_ENV_VARS[0]} (or pass --allow-unsigned: sha256 only)")
    key = secret.encode("utf-8") if secret else None

    root = args.registry_root
    reader = ModelReader(
        {"bootstrap.servers": args.bootstrap_servers},
        args.topic,
        args.model,
        key,
        registry_root=root if root is None or is_store_url(root) else Path(root),
        store_settings=ObjectStoreSettings(
            endpoint_url=args.s3_endpoint, region=args.s3_region, path_style=args.s3_path_style
        ),
        scope=args.scope,
    )
    reader.start()
    try:
        what = f"model {args.model} on topic {args.topic}"
        if args.scope != "global":
            what += f" (a champion of any {args.scope} slot)"
        started = time.monotonic()
        if not wait_for_first_version(reader, args.wait_s, what):
            print(
                f"no champion of {args.model} within {args.wait_s:.0f}s: is the service "
                "running, and is --wait-s above its registry.publish_every_seconds?",
                file=sys.stderr,
            )
            return 1
        if args.scope != "global":
            return serve_keyed(reader, max(0.0, args.wait_s - (time.monotonic() - started)))
        for line in sys.stdin:
            if line.strip():
                prediction = reader.predict_record(json.loads(line))
                print(
                    json.dumps({"version": reader.version, "prediction": prediction}, default=str)
                )
    except KeyboardInterrupt:
        pass
    finally:
        reader.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
