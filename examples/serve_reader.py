"""Serve the current champion of a model, hot-reloaded from the versions topic.

    STREAM_TRAINER_REGISTRY_KEY=... python examples/serve_reader.py \\
        --bootstrap-servers localhost:9092 --topic model-versions --model my-model

The key is the one the service signs versions with: the same key as its checkpoints
(``STREAM_TRAINER_CHECKPOINT__HMAC_KEY``). It is read from ``STREAM_TRAINER_REGISTRY_KEY``,
falling back to ``STREAM_TRAINER_CHECKPOINT__HMAC_KEY``; without either, only sha256 is
checked (``--allow-unsigned``), which detects corruption but not tampering.

Reads JSON feature objects from stdin, one per line, and prints the prediction of the
model being served at that moment, with its version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from stream_trainer.reader import ModelReader

KEY_ENV_VARS = ("STREAM_TRAINER_REGISTRY_KEY", "STREAM_TRAINER_CHECKPOINT__HMAC_KEY")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True, help="the service's topics.versions")
    parser.add_argument("--model", required=True, help="the service's model.name")
    parser.add_argument(
        "--registry-root",
        type=Path,
        default=None,
        help="where the registry volume is mounted here, if not at the service's path",
    )
    parser.add_argument("--allow-unsigned", action="store_true")
    parser.add_argument("--wait-s", type=float, default=30.0, help="wait for a first model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    secret = next((os.environ[name] for name in KEY_ENV_VARS if os.environ.get(name)), None)
    if secret is None and not args.allow_unsigned:
        parser.error(f"set {KEY_ENV_VARS[0]} (or pass --allow-unsigned: sha256 only)")
    key = secret.encode("utf-8") if secret else None

    reader = ModelReader(
        {"bootstrap.servers": args.bootstrap_servers},
        args.topic,
        args.model,
        key,
        registry_root=args.registry_root,
    )
    reader.start()
    try:
        if not reader.wait_until_serving(args.wait_s):
            print(f"no champion of {args.model} within {args.wait_s}s", file=sys.stderr)
            return 1
        for line in sys.stdin:
            if line.strip():
                prediction = reader.predict_one(json.loads(line))
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
