"""A model that pickles by reference to a module a separate serving process can import."""

from __future__ import annotations


class VersionModel:
    """Every prediction is the version it was published as."""

    def __init__(self, version: int) -> None:
        self.version = version

    def predict_one(self, x: dict[str, float]) -> int:
        return self.version


class ConstantModel:
    """Every prediction is ``value``: tells apart the models of different slots."""

    def __init__(self, value: str) -> None:
        self.value = value

    def predict_one(self, x: dict[str, float]) -> str:
        return self.value

    # Enough of the ModelAdapter protocol for ModelPublisher to publish it as a slot's
    # model (tests/integration/test_scoped_reader.py): nothing learnt, nothing to check.

    def is_fitted(self) -> bool:
        return True

    def parameters_finite(self) -> bool:
        return True

    def describe(self) -> dict[str, str]:
        return {"path": "tests.served_model.ConstantModel", "value": self.value}
