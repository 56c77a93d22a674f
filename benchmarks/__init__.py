"""Benchmarks, each run as `python -m benchmarks.<name>` and printing JSON."""
