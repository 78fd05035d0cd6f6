"""Versions out: registries, the promotion path, events, the reader, MLflow.

Imports nothing: see docs/design/scale-out.md 9.1."""
