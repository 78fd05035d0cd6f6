"""The container tests' session fixture ``images`` (private dockerd, built images) is in
tests/container/fixtures.py, registered suite-wide by tests/conftest.py so tests/kube
shares the same daemon."""

from __future__ import annotations

# The fixture lives in tests/container/fixtures.py (a plugin of the root conftest).
from tests.container.fixtures import DEMO_IMAGE, Images

__all__ = ["DEMO_IMAGE", "Images"]
