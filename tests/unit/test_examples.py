"""The example reader waits long enough for what the shipped configs publish."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from stream_trainer.config import Settings, load_settings
from stream_trainer.publishing.reader import NoModelForKey

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SECRET_ENV = {
    "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": "k" * 32,
    "STREAM_TRAINER_KAFKA__SASL_PASSWORD": "p",
}
# Start-up, a fit and the gate on top of the time triggers.
MARGIN_S = 120.0


def serve_reader() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "serve_reader", ROOT / "examples" / "serve_reader.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds_to_first_version(settings: Settings) -> float:
    """Upper bound, from the time triggers alone, on when a first version is published.

    A version is published after a durable checkpoint once its trigger is due; in
    full_batch the model exists only after the first retrain. Record-count triggers are
    left out: a slow input may never reach them. Time triggers fire only once a record
    arrived since the last action (the one cadence): the bound assumes input keeps coming.
    """
    registry = settings.registry
    checkpoint_s = settings.checkpoint.every_seconds
    assert checkpoint_s is not None, "checkpoint.every_seconds unset: no time bound"
    if settings.training.mode == "full_batch":
        retrain_s = settings.training.full_batch.retrain_every_seconds
        assert retrain_s is not None, "full_batch without retrain_every_seconds: no time bound"
        if registry.publish_after_retrain:
            return retrain_s + checkpoint_s
        assert registry.publish_every_seconds is not None
        return retrain_s + registry.publish_every_seconds + checkpoint_s
    assert registry.publish_every_seconds is not None, "no publish time trigger: no bound"
    return registry.publish_every_seconds + checkpoint_s


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_reader_waits_longer_than_the_config_takes_to_publish(path: Path) -> None:
    bound = seconds_to_first_version(load_settings(path, env=SECRET_ENV))
    wait = serve_reader().DEFAULT_WAIT_S
    print(f"{path.name}: first version within {bound:.0f}s, reader waits {wait:.0f}s")
    assert wait >= bound + MARGIN_S, (
        f"{path.name} may publish its first version only after {bound:.0f}s; "
        f"examples/serve_reader.py waits {wait:.0f}s"
    )


class FakeReader:
    """Serves from its ``serving_after``-th wait on; records the timeouts asked for."""

    def __init__(self, serving_after: int | None) -> None:
        self.serving_after = serving_after
        self.timeouts: list[float] = []

    def wait_until_serving(self, timeout: float) -> bool:
        self.timeouts.append(timeout)
        if self.serving_after is not None and len(self.timeouts) >= self.serving_after:
            return True
        if self.serving_after is None:
            threading.Event().wait(timeout)  # blocks like the real reader's condition wait
        return False


def test_reader_waits_in_progress_steps(capsys: pytest.CaptureFixture[str]) -> None:
    module = serve_reader()
    reader = FakeReader(serving_after=3)
    assert module.wait_for_first_version(reader, 10_000.0, "model m on topic t")
    assert reader.timeouts[:2] == [module.PROGRESS_EVERY_S] * 2
    assert capsys.readouterr().err.count("waiting for a first version of model m") == 3


def test_reader_gives_up_after_its_wait() -> None:
    module = serve_reader()
    reader = FakeReader(None)
    assert not module.wait_for_first_version(reader, 0.05, "model m")
    assert len(reader.timeouts) == 1 and reader.timeouts[0] <= 0.05


class FakeScopedReader:
    """Two slots: keys starting with "a" have a champion (version 7), others none."""

    def slot_for_key(self, key: bytes | None, topic: str | None = None) -> str:
        assert key is not None
        return "orders:0" if key.startswith(b"a") else "orders:1"

    def predict_record(self, features: dict[str, Any], *, key: bytes | None = None) -> Any:
        assert key is not None
        if not key.startswith(b"a"):
            raise NoModelForKey("model m: no champion for slot orders:1")
        return (True, features["x"])

    def loaded(self) -> dict[str, int]:
        return {"orders:0": 7}


def test_keyed_line_names_its_slot_and_version() -> None:
    module = serve_reader()
    out = module.predict_keyed(FakeScopedReader(), '{"key": "ab", "features": {"x": 0.5}}\n')
    assert out == {"key": "ab", "slot": "orders:0", "version": 7, "prediction": (True, 0.5)}


def test_keyed_line_without_a_champion_says_so_and_serving_goes_on() -> None:
    module = serve_reader()
    out = module.predict_keyed(FakeScopedReader(), '{"key": "b", "features": {"x": 1}}')
    assert (out["slot"], out["version"], out["prediction"]) == ("orders:1", None, None)
    assert "no champion for slot orders:1" in out["error"]


@pytest.mark.parametrize(
    "line", ['{"x": 1}', '{"key": 5, "features": {}}', '{"key": "a", "features": [1]}', "[]"]
)
def test_keyed_line_of_another_shape_is_refused_with_the_expected_one(line: str) -> None:
    with pytest.raises(ValueError, match="features"):
        serve_reader().predict_keyed(FakeScopedReader(), line)
