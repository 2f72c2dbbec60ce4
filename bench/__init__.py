"""The benchmark harness: memory and throughput sweeps, their workers and pytest-benchmark suite."""
