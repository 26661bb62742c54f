"""Benchmarks: each `run(...)` returns one JSON object; `liber bench NAME` prints it."""
