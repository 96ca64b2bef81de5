"""Performance benchmarks: index overhead, query speed, vector codecs and the synthetic scale curve.

`python -m benchmarks.perf.run` measures everything in one process (with one child process per
scale size) and writes benchmarks/results/perf.md; `python -m benchmarks.perf.gpu` is the same
pipeline sized for a GPU machine.
"""
