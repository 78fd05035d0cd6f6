"""The README's Kubernetes commands create what the chart's default values read."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VALUES = ROOT / "helm" / "stream-trainer" / "values.yaml"


def secret_commands(text: str) -> list[list[str]]:
    """Every ``kubectl create secret generic …`` line of the README's bash blocks, split."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S)
    return [
        shlex.split(line)
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith("kubectl create secret generic")
    ]


def literal_keys(argv: list[str]) -> set[str]:
    """Keys a ``kubectl create secret generic`` command puts into the Secret."""
    keys = set()
    for i, arg in enumerate(argv):
        joined = f"{arg}={argv[i + 1]}" if arg in ("--from-literal", "--from-file") else arg
        for flag in ("--from-literal=", "--from-file="):
            if joined.startswith(flag):
                keys.add(joined[len(flag) :].split("=", 1)[0])
    return keys


def test_literal_keys() -> None:
    argv = shlex.split('kubectl create secret generic s --from-literal=k="$(x)" --from-file k2=p')
    assert literal_keys(argv) == {"k", "k2"}


def test_readme_secret_command_creates_the_key_the_chart_reads() -> None:
    checkpoint_key = yaml.safe_load(VALUES.read_text("utf-8"))["secrets"]["checkpointKey"]
    commands = secret_commands(README.read_text("utf-8"))
    assert commands, "README has no `kubectl create secret generic` command"
    by_name = {argv[4]: argv for argv in commands}
    name = checkpoint_key["existingSecret"]
    assert name in by_name, f"README creates {sorted(by_name)}, the chart reads Secret {name!r}"
    keys, wanted = literal_keys(by_name[name]), checkpoint_key["key"]
    assert wanted in keys, f"README's Secret {name!r} has keys {sorted(keys)}, not {wanted!r}"
