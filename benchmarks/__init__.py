"""Benchmarks of the trainer, the cache and the studies; each module runs as `python benchmarks/bench_x.py` from the
repository root and writes its figures to benchmarks/results/. Their shared helpers: benchmarks/common.py."""
