"""Placeholder: the benchmark (being written)."""

from __future__ import annotations

import argparse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stream-trainer bench``."""


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark."""
    raise NotImplementedError
