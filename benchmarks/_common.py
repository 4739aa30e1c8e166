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


def paired_medians(
    *fns: Callable[[], object], repeat: int = 7, warmup: int = 2
) -> list[float]:
    """Median wall time of each function, timed in alternation (A, B, A, B, ...).

    On a shared machine, load drifts during a run; alternating exposes every contender to
    the same drift, so the ratio of the medians is steadier than timing them one after another.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def emit(figures: dict[str, object], *, as_json: bool) -> None:
    """Print figures, one per line for people, then always the final one-line JSON object."""
    if not as_json:
        for name, value in figures.items():
            print(f"{name:>32}: {value}")
    print(json.dumps(figures, sort_keys=True))
