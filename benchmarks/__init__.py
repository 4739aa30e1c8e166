"""privfed benchmarks."""
