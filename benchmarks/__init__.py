"""Benchmark scripts: each prints a fixed-width table and writes JSON (see benchmarks/README.md)."""
