"""Benchmark harness for ptfast: times ptfast's backends against PyTorch baselines, op by op.

Entry points: ``python -m benchmarks.run`` (tables, JSON and plots) and ``benchmarks/test_benchmarks.py``
(pytest-benchmark). See ``benchmarks/README.md``.
"""
