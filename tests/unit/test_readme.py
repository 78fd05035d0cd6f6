"""The README stays in sync with the code it documents."""

from __future__ import annotations

import re
from pathlib import Path

from stream_trainer.cli import build_parser
from stream_trainer.config_docs import END, START, render

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_reference_is_generated_from_the_models() -> None:
    embedded = README.split(START, 1)[1].split(END, 1)[0].strip()
    assert embedded == render().strip(), (
        "README's configuration reference is stale: run "
        "`python -m stream_trainer.config_docs --write`"
    )


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    lines = [ln.split("#")[0].strip() for ln in first_block.group(1).splitlines()]
    assert lines[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


def test_every_subcommand_is_in_the_cli_reference() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name in subparsers.choices:  # type: ignore[union-attr]
        assert f"| `{name}" in README, f"CLI reference lacks {name}"
