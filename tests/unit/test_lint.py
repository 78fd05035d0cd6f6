"""The code-style gates of ``make lint`` run in the test suite too, so CI holds them.

They had drifted while only ``make lint`` ran them: ruff's formatter disagreed with 21 files
and mypy strict with the test harness. Each gate is the tool itself on the whole tree.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source checks whose verdict does not depend on the interpreter (ruff's target-version and
# mypy's python_version are 3.11): .ci/run runs them once, in `make test`, and deselects
# them (-m "not lint") on the other supported Pythons.
pytestmark = pytest.mark.lint

GATES = {
    "ruff-check": [sys.executable, "-m", "ruff", "check", "."],
    "ruff-format": [sys.executable, "-m", "ruff", "format", "--check", "."],
    "mypy-strict": [sys.executable, "-m", "mypy", "stream_trainer", "tests"],
}


@pytest.mark.parametrize("gate", sorted(GATES))
def test_lint_gate_passes(gate: str) -> None:
    result = subprocess.run(
        GATES[gate], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{gate} failed:\n{result.stdout[-4000:]}{result.stderr}"
