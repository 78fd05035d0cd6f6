"""Hyperparameter search of full retrains: study, trials, Kubernetes Jobs.

Imports nothing: see docs/design/scale-out.md 9.1."""
