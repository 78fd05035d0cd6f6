"""The loop and what runs around it: the services, the composition root, HTTP,
metrics, logs, signals, control commands, crash points, child processes.

Imports nothing: see docs/design/scale-out.md 9.1."""
