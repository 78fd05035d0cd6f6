"""Every subcommand's ``--help`` says what it does, what each flag means, shows an
example and lists its exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from stream_trainer.cli import build_parser


def subparsers(
    parser: argparse.ArgumentParser, prefix: str = "stream-trainer"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (nested) subcommand parser, with its command line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield f"{prefix} {name}", child
                yield from subparsers(child, f"{prefix} {name}")


def test_the_walk_finds_the_nested_commands() -> None:
    names = {name for name, _ in subparsers(build_parser())}
    assert {"stream-trainer checkpoint inspect", "stream-trainer versions promote"} <= names


def test_every_subcommand_has_a_description_flag_help_example_and_exit_codes() -> None:
    problems = []
    for name, parser in subparsers(build_parser()):
        if not (parser.description or "").strip():
            problems.append(f"{name}: no description")
        for action in parser._actions:
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                problems.append(f"{name}: {action.option_strings or action.dest} has no help")
        epilog = parser.epilog or ""
        if "Example" not in epilog:
            problems.append(f"{name}: no example in the epilog")
        if "Exit codes" not in epilog:
            problems.append(f"{name}: no exit codes in the epilog")
        formatter = parser._get_formatter()
        if "Example" in epilog and not isinstance(formatter, argparse.RawDescriptionHelpFormatter):
            problems.append(f"{name}: the epilog's layout would be re-wrapped")
    assert not problems, "\n".join(problems)


def test_help_renders_the_example_as_written() -> None:
    parser = dict(subparsers(build_parser()))["stream-trainer produce"]
    text = parser.format_help()
    assert "Example" in text and "\n  stream-trainer produce " in text
    assert "Exit codes" in text
