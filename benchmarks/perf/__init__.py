"""Performance benchmarks: index overhead, query speed, codecs, the approximate path, the scale curve.

`python -m benchmarks.perf.run` measures everything and writes benchmarks/results/perf.md. Each
scale-curve query and each codec encoding runs in a child process. `python -m benchmarks.perf.gpu`
is the same pipeline sized for a GPU machine.
"""
