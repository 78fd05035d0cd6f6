"""Laptop tooling: ``demo``, ``bench``, ``produce``, the embedded Tansu broker, datasets,
the learning-curve plot and the service-process helper they share.

Never imported by the production code path (``run`` and its worker children): the CLI
imports these modules lazily inside the subcommands that need them, and
tests/unit/test_packaging.py checks the service's modules load none of them.
"""
