"""Tiny timing helpers shared by benchmarks: warm up, repeat, take the median, print JSON."""

import json
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], *, repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(figures: dict[str, object], *, as_json: bool) -> None:
    """Print figures, one per line for people, then always the final one-line JSON object."""
    if not as_json:
        for name, value in figures.items():
            print(f"{name:>32}: {value}")
    print(json.dumps(figures, sort_keys=True))
