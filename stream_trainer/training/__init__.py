"""Models learn: learners, trainers, evaluation, online selection, full retrains.

Imports nothing: see docs/design/scale-out.md 9.1."""
