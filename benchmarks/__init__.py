"""Benchmarks of trimdb: run them from the repository root, for example `python -m benchmarks.perf.run`."""
