"""The README and docs/ stay in sync with the code they document."""

from __future__ import annotations

import re
from pathlib import Path

from stream_trainer.cli import build_parser
from stream_trainer.config_docs import END, REFERENCE, START, render

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_reference_is_generated_from_the_models() -> None:
    page = (ROOT / REFERENCE).read_text(encoding="utf-8")
    embedded = page.split(START, 1)[1].split(END, 1)[0].strip()
    assert embedded == render().strip(), (
        f"{REFERENCE} is stale: run `python -m stream_trainer.config_docs --write`"
    )


def test_readme_links_the_configuration_reference() -> None:
    assert f"]({REFERENCE.as_posix()})" in README
    assert START not in README, "the reference moved to docs/configuration.md"


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    lines = [ln.split("#")[0].strip() for ln in first_block.group(1).splitlines()]
    assert lines[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


def test_every_subcommand_is_in_the_cli_references() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    full = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name in subparsers.choices:  # type: ignore[union-attr]
        assert f"| `{name}" in README, f"README's CLI table lacks {name}"
        assert f"| `{name}" in full, f"docs/cli.md lacks {name}"
