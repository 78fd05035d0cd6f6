"""Labelled streams to produce into Kafka: River's bundled datasets and synthetic ones.

Everything here ships inside installed packages or is generated: nothing is downloaded.
Each dataset states its record contract (task, feature names, labels) so the demo and
tests can build a matching config.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Row = tuple[dict[str, Any], Any]


@dataclass(frozen=True)
class Dataset:
    """A named stream and the record contract it satisfies."""

    name: str
    task: str
    features: tuple[str, ...]
    labels: tuple[Any, ...] | None
    size: int | None  # records in one pass; None = unbounded (synthetic)
    description: str
    _rows: Callable[[int], Iterator[Row]]
    # The typed record contract (record.features entries) when not all required numbers.
    typed_features: tuple[dict[str, Any], ...] | None = None

    @property
    def record_features(self) -> list[str | dict[str, Any]]:
        """``record.features`` for a config that reads this dataset."""
        if self.typed_features is None:
            return list(self.features)
        return [dict(f) for f in self.typed_features]

    def rows(self, limit: int, seed: int = 42) -> Iterator[Row]:
        """Up to ``limit`` rows; bounded datasets repeat from the start when exhausted."""
        if self.size is None:
            return itertools.islice(self._rows(seed), limit)
        return itertools.islice(_repeat(self._rows, seed), limit)


def _repeat(factory: Callable[[int], Iterator[Row]], seed: int) -> Iterator[Row]:
    while True:
        empty = True
        for row in factory(seed):
            empty = False
            yield row
        if empty:
            return


def _river_rows(name: str) -> Callable[[int], Iterator[Row]]:
    def rows(_seed: int) -> Iterator[Row]:
        from river import datasets  # noqa: PLC0415 - heavy import, only when used

        for x, y in getattr(datasets, name)():
            yield {k: float(v) for k, v in x.items()}, y

    return rows


def _phishing_rows(_seed: int) -> Iterator[Row]:
    from river import datasets  # noqa: PLC0415

    for x, y in datasets.Phishing():
        yield {k: float(v) for k, v in x.items()}, bool(y)


def _bananas_rows(_seed: int) -> Iterator[Row]:
    from river import datasets  # noqa: PLC0415

    for x, y in datasets.Bananas():  # type: ignore[no-untyped-call]
        yield {f"x{k}": float(v) for k, v in x.items()}, bool(y)


def _sea_drift_rows(seed: int) -> Iterator[Row]:
    """SEA concepts: variant 0 for the first 5000 records, then an abrupt switch to 3."""
    from river.datasets import synth  # noqa: PLC0415

    stream = synth.ConceptDriftStream(
        stream=synth.SEA(variant=0, seed=seed),
        drift_stream=synth.SEA(variant=3, seed=seed + 1),
        position=5000,
        width=50,  # River computes exp(-4(t-position)/width): width 1 overflows
        seed=seed,
    )
    for x, y in stream:
        yield {f"f{k}": float(v) for k, v in x.items()}, bool(y)


def _linear_rows(seed: int, n_features: int = 20) -> Iterator[Row]:
    """A noisy linear concept over ``n_features`` Gaussian features (the bench workload)."""
    rng = random.Random(seed)
    weights = [rng.uniform(-1, 1) for _ in range(n_features)]
    names = [f"f{i}" for i in range(n_features)]
    while True:
        values = [rng.gauss(0, 1) for _ in range(n_features)]
        score = sum(w * v for w, v in zip(weights, values, strict=True)) + rng.gauss(0, 0.5)
        yield dict(zip(names, values, strict=True)), score > 0


def _friedman_rows(seed: int) -> Iterator[Row]:
    from river.datasets import synth  # noqa: PLC0415

    for x, y in synth.Friedman(seed=seed):
        yield {f"f{k}": float(v) for k, v in x.items()}, float(y)


MERCHANT_CATEGORIES: tuple[str, ...] = (
    "grocery",
    "restaurants",
    "fuel",
    "travel",
    "electronics",
    "online_services",
)
DEVICES: tuple[str, ...] = ("pos", "mobile", "desktop")
_COUNTRIES: tuple[str, ...] = (
    "DE", "FR", "GB", "US", "ES", "IT", "NL", "PL", "SE", "BR",
    "IN", "NG", "RU", "CN", "JP", "MX", "TR", "ZA", "AU", "CA",
)  # fmt: skip
TRANSACTIONS_DRIFT_AT = 6000
TRANSACTIONS_FEATURES: tuple[dict[str, Any], ...] = (
    {"name": "amount"},
    {"name": "hour"},
    {
        "name": "merchant_category",
        "type": "category",
        "categories": list(MERCHANT_CATEGORIES[:-1]),  # online_services: unlisted (other)
    },
    {"name": "country", "type": "category", "missing": "allow"},  # open list, hashed
    {"name": "device", "type": "category", "categories": list(DEVICES), "missing": "allow"},
    {"name": "international", "type": "boolean"},
    {"name": "card_present", "type": "boolean", "missing": "allow"},
    {"name": "customer_age", "missing": "allow"},
)


def _transactions_rows(seed: int) -> Iterator[Row]:
    """Card transactions with category, boolean and missing values; fraud or not.

    Which merchant categories and devices are risky flips at record
    ``TRANSACTIONS_DRIFT_AT`` (a concept drift a retrain must follow). country is an open
    category (a few are risky), device is missing for ~10 %, card_present for ~15 %,
    customer_age for ~20 %; a category unlisted in the contract (online_services) appears
    too.
    """
    rng = random.Random(seed)
    risky_countries = {"NG", "RU", "BR"}
    for index in itertools.count():
        before = index < TRANSACTIONS_DRIFT_AT
        category = rng.choice(MERCHANT_CATEGORIES)
        device = rng.choice(DEVICES)
        country = rng.choice(_COUNTRIES)
        international = rng.random() < 0.3
        card_present = device == "pos" and rng.random() < 0.9
        amount = round(rng.lognormvariate(3.5, 1.0), 2)
        hour = float(rng.randrange(24))
        age = float(rng.randrange(18, 90))
        score = -2.4 + 0.6 * math.log1p(amount) / 3.0
        risky_category = {"electronics", "online_services"} if before else {"travel", "fuel"}
        risky_device = "desktop" if before else "mobile"
        score += 2.2 * (category in risky_category) + 1.2 * (device == risky_device)
        score += 1.0 * (country in risky_countries) + 0.8 * international
        score += -1.0 * card_present + 0.6 * (hour < 6) - 0.01 * (age - 50)
        fraud = rng.random() < 1.0 / (1.0 + math.exp(-2.0 * score))
        x: dict[str, Any] = {
            "amount": amount,
            "hour": hour,
            "merchant_category": category,
            "international": international,
        }
        if rng.random() < 0.95:  # null and absent both mean missing
            x["country"] = country
        elif rng.random() < 0.5:
            x["country"] = None
        if rng.random() < 0.9:
            x["device"] = device
        if rng.random() < 0.85:
            x["card_present"] = card_present
        if rng.random() < 0.8:
            x["customer_age"] = age
        yield x, fraud


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "phishing",
            "binary_classification",
            (
                "empty_server_form_handler",
                "popup_window",
                "https",
                "request_from_other_domain",
                "anchor_from_other_domain",
                "is_popular",
                "long_url",
                "age_of_domain",
                "ip_in_url",
            ),
            (False, True),
            1250,
            "River's bundled Phishing websites dataset (1250 records, repeats when asked for more)",
            _phishing_rows,
        ),
        Dataset(
            "bananas",
            "binary_classification",
            ("x1", "x2"),
            (False, True),
            5300,
            "River's bundled Bananas dataset (5300 records, 2 features, non-linear)",
            _bananas_rows,
        ),
        Dataset(
            "trump-approval",
            "regression",
            ("ordinal_date", "gallup", "ipsos", "morning_consult", "rasmussen", "you_gov"),
            None,
            1001,
            "River's bundled TrumpApproval regression dataset (1001 records)",
            _river_rows("TrumpApproval"),
        ),
        Dataset(
            "sea-drift",
            "binary_classification",
            ("f0", "f1", "f2"),
            (False, True),
            None,
            "Synthetic SEA stream with an abrupt concept drift at record 5000",
            _sea_drift_rows,
        ),
        Dataset(
            "linear20",
            "binary_classification",
            tuple(f"f{i}" for i in range(20)),
            (False, True),
            None,
            "Synthetic: 20 Gaussian features, noisy linear binary label",
            _linear_rows,
        ),
        Dataset(
            "friedman",
            "regression",
            tuple(f"f{i}" for i in range(10)),
            None,
            None,
            "Synthetic Friedman #1 regression stream (10 features)",
            _friedman_rows,
        ),
        Dataset(
            "transactions",
            "binary_classification",
            tuple(f["name"] for f in TRANSACTIONS_FEATURES),
            (False, True),
            None,
            "Synthetic card transactions: category, boolean and missing features, fraud "
            f"label, concept drift at record {TRANSACTIONS_DRIFT_AT}",
            _transactions_rows,
            TRANSACTIONS_FEATURES,
        ),
    )
}


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name``; ValueError listing the choices otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
