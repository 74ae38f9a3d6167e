"""Benchmarks (GPU and CPU), printing JSON lines; not part of the test suite. See docs/performance.md."""
