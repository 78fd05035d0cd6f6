"""Every exception stream-trainer defines derives from StreamTrainerError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import stream_trainer
from stream_trainer.errors import StreamTrainerError
from stream_trainer.training.learners import IncompatibleLearner


def defined_exceptions() -> dict[str, type[BaseException]]:
    """``module.Class`` -> class, for every exception class defined in the package."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(stream_trainer.__path__, "stream_trainer."):
        if info.name.endswith(".__main__"):
            continue  # runs the CLI when imported; defines nothing
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_exception_of_the_package_is_a_stream_trainer_error() -> None:
    found = defined_exceptions()
    print(f"{len(found)} exception classes: {', '.join(sorted(found))}")
    assert "stream_trainer.state.kafka_lease.LeaseError" in found  # the walk reaches the modules
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, StreamTrainerError))
    assert not outside, f"not StreamTrainerError subclasses: {outside}"


def test_other_bases_are_kept() -> None:
    # Existing `except ValueError` around learner construction keeps working.
    assert issubclass(IncompatibleLearner, ValueError)
    assert issubclass(IncompatibleLearner, StreamTrainerError)
