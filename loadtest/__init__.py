"""Load tests and benchmarks (see README.md here)."""
