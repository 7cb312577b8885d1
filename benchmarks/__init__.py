"""Speed and memory benchmarks: `python -m benchmarks --help`."""
