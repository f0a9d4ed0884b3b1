"""Benchmarks: each prints one JSON object on stdout, against a baseline measured in the same run."""
