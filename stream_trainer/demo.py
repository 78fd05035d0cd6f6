"""Placeholder: the one-command demo (being written)."""

from __future__ import annotations

import argparse


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stream-trainer demo``."""


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo."""
    raise NotImplementedError
