"""Model adapter wrappers for search tests whose trials run in joblib worker processes: they
must be importable there by name (a test module's own classes are not, outside pytest)."""

from __future__ import annotations

import os
from typing import Any


class FailsOnDepth:
    """``with_params`` raises for one ``learner.max_depth``, naming the process it ran in."""

    def __init__(self, inner: Any, bad_depth: int) -> None:
        self.inner, self.bad = inner, bad_depth

    def with_params(self, overrides: dict[str, Any]) -> Any:
        if overrides.get("learner.max_depth") == self.bad:
            raise ValueError(f"depth {self.bad} refused in pid {os.getpid()}")
        return self.inner.with_params(overrides)


class DiesOnDepth:
    """``with_params`` ends its process at once for one ``learner.max_depth`` (as a crash in C
    code or the kernel's OOM killer would), elsewhere it is the wrapped adapter's."""

    def __init__(self, inner: Any, bad_depth: int) -> None:
        self.inner, self.bad = inner, bad_depth

    def with_params(self, overrides: dict[str, Any]) -> Any:
        if overrides.get("learner.max_depth") == self.bad:
            os._exit(3)
        return self.inner.with_params(overrides)
