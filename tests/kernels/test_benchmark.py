"""The benchmark's contract: last stdout line is one JSON object with the issue's keys."""

import json
import subprocess
import sys

import pytest

KEYS = {"keystream_vs_openssl", "quantize_vs_flower", "mask_vs_flower", "accumulate_vs_memcpy",
        "bytes_per_param"}
# How close one thread could come at best, and what a second thread does, beside the target.
QUANTIZE_KEYS = {"quantize_2threads_vs_flower", "quantize_ms", "quantize_dither_keystream_ms",
                 "quantize_fresh_copy_ms", "quantize_1thread_ceiling_vs_flower"}


def test_quick_benchmark_prints_the_figures_as_a_final_json_line():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--json", "--quick"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) >= KEYS
    assert figures["bytes_per_param"] == 4 and figures["threads"] == 1
    assert all(figures[k] > 0 for k in KEYS | QUANTIZE_KEYS)
    # Both ratios share Flower's time: their quotient is (keystream + copy) / quantize time.
    floor_ms = figures["quantize_dither_keystream_ms"] + figures["quantize_fresh_copy_ms"]
    quotient = figures["quantize_vs_flower"] / figures["quantize_1thread_ceiling_vs_flower"]
    assert quotient == pytest.approx(floor_ms / figures["quantize_ms"], rel=0.02)
