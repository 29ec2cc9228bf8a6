"""Benchmarks: long runs and speed/memory measurements, each writing JSON to bench/results/.

Targets are ratios against a baseline measured in the same run, never wall-clock limits
asserted in tests.
"""
