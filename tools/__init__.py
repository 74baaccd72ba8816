"""Measurement scripts run from the repository root (`python -m tools.<name>`): they produce the figures in docs/,
and are not part of the library."""
