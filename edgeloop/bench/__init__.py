"""Benchmarks behind `edgeloop bench`: each prints a table and writes JSON."""
