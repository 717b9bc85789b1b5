"""Benchmarks: each `python -m bench.<name>` prints a markdown table (no timed assertions)."""
