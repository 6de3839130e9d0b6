"""Benchmarks: each script explains what it measures, prints a table and ends with one JSON line."""
